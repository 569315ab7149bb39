import sys

from videollm.cli import main

sys.exit(main())
