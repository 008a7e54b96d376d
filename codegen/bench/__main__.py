import sys

from codegen.bench.run import main

sys.exit(main())
