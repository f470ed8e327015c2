"""The ``tml`` command-line client.

- ``main``: the entry point and argument parser; ``commands/``: one module per area;
- ``context``: what a command handler gets; ``config``: the URL, token and CA file;
- ``client``: the switchboard's JSON API on treq; ``retry``: backoff and a deadline;
  ``sse``: a Server-Sent Events parser;
- ``output``: tables, ``key: value`` lines and JSON; ``jobids``: short job ids;
- ``streams``: standard output that stops the command when it cannot be written.
"""
