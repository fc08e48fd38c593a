import sys

from supernet.cli import main

sys.exit(main())
