"""The ``tml`` commands, one module per area; each has ``register(sub, common)``.

- ``identity`` (login, whoami, token), ``keys`` (SSH keys), ``admin`` (administrators);
- ``hosts``, ``images``, ``grants``, ``audit``;
- ``jobs`` (submit, list, show, cancel), ``follow`` (a job's events and console to its
  end), ``logs``, ``results``, ``artifacts`` (``--artifacts DIR``), ``connect`` (ssh,
  published services).
"""
