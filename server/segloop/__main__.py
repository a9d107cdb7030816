import sys

from segloop.cli import main

sys.exit(main())
