import os
import sys

# OpenMP's threads (torch's and numba's) spin after each parallel region by default; on two shared cores any other
# process then makes a two-thread contender wait milliseconds a call (torch-2t's attention took 846 ms where
# torch-1t took 55, a trivial numba prange 8 ms where passive waiting takes 9 us). Every contender waits passively,
# set here before either runtime starts; OMP_WAIT_POLICY=active make bench measures them spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from codegen.bench.run import main  # noqa: E402

sys.exit(main())
