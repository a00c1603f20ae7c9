import sys

from opt.cli import main

sys.exit(main())
