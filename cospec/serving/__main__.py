import sys

from cospec.serving.main import main

sys.exit(main())
