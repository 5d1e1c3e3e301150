"""``python -m training``: the same as ``impatient-train`` (also what torchrun runs with ``-m training``)."""

from training.cli import main

raise SystemExit(main())
