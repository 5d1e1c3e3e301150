"""``python -m impatient_ros.training`` (``python -m training`` from a source checkout): the same as
``impatient-train``, and what torchrun runs with ``-m``."""

from .cli import main

raise SystemExit(main())
