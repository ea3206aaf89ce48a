"""``python -m npflux.cli ...`` is the ``npflux`` command."""
from . import main

main()
