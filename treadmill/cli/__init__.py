"""The ``tml`` command-line client."""
