"""`python -m nanogpt_mlx.training.corpus --out DIR`: build the offline corpus."""

import sys

from nanogpt_mlx.training.corpus.build import main

sys.exit(main())
