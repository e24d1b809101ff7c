import sys

from neoxko.cli import main

sys.exit(main())
