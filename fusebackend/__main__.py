"""python -m fusebackend dump TARGET ...  (the same as the `fusebackend` console script)."""
import sys

from .inspection.cli import main

sys.exit(main())
