import sys

from tpi_mpi.perf.cli import main

sys.exit(main())
