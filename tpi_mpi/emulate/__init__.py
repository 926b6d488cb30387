"""Edge-device emulation: one MPI rank per emulated device, with a memory cap, a CPU share and a disk rate
(cgroups) and shaped links (network namespaces, tc, and a delay stage). See `python -m tpi_mpi.emulate`
and docs/emulation.md.

    profiles.py  device and network profiles (conf/device, conf/network)
    session.py   up / down / leftovers of a session; state.py its state file
    netns.py     namespaces, veths, bridge, tc, iptables;  delayd.py  the NFQUEUE delay daemon
    cgroups.py   memory / CPU / disk caps (v1 and v2);     rank.py    the per-rank wrapper mpirun starts
    check.py     what the emulator really gives, measured
"""
