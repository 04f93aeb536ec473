"""python -m fusebackend dump TARGET ...  (the same as the `fusebackend` console script)."""
import sys

from .cli import main

sys.exit(main())
