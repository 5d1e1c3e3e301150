"""impatient_ros: deadline-aware anytime classification with Impatient DNNs.

The message classes (``impatient_ros.msg``) are generated at build time and
installed next to these modules. When the code runs from a source checkout the
source folder shadows the installed package, so the package path is extended
with every other ``impatient_ros`` folder on ``sys.path``: the source modules
win, and ``impatient_ros.msg`` still resolves to the installed, generated one.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
