"""Under mpirun: a helper thread of rank 1 raises while every main thread waits in a collective.

Without main_guard's thread hook the exception would be printed and the job would wait for ever; with it,
rank 1 prints one line and MPI_Abort ends every rank.
"""

import threading
import time

from mpi4py import MPI

from tpi_mpi.errors import main_guard


def helper() -> None:
    time.sleep(0.2)
    raise ValueError(f"helper thread failed at unix time {time.time():.3f}")


@main_guard
def main() -> None:
    comm = MPI.COMM_WORLD
    if comm.rank == 1:
        threading.Thread(target=helper).start()
    # Both main threads wait for a message that never comes; only rank 1's helper thread runs (a hang is
    # caught by the test's timeout)
    comm.recv(source=1 - comm.rank)


main()
