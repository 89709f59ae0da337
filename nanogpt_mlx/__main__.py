import sys

from nanogpt_mlx.cli import main

sys.exit(main())
