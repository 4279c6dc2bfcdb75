import sys

from edgelora.cli import main

sys.exit(main())
