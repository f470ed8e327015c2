"""The daemon kit shared by every role.

- ``config``: the settings table (TOML file, command line) and the config it builds;
  ``settingsfile``: a role's settings declared as data (its package's ``settings.toml``).
- ``daemon``: the root ``RoleService``, listeners, operator services, ``twistd_service``.
- ``gcpolicy``: when the garbage collector scans long-lived objects (freeze, full pass).
- ``http``: the JSON error shape and handlers, hardened sites, request logging, bodies.
- ``keys``: the switchboard's capability keys, for the satellite roles.
- ``captoken``: capability tokens (signing, verification).
- ``logging``, ``tls``, ``manhole``, ``metrics``, ``ratelimit``, ``sshkeys``.
- ``messages``: JSON messages over a WebSocket; ``schema``: JSON Schema validation;
  ``schemacheck``: schemas compiled into predicates (a quick "valid").
- ``cors``: cross-origin reads (the web console reading log servers).
- ``files``: atomic, durable file writes; ``ranges``: HTTP ``Range`` headers.
- ``splice``: joining two connections with backpressure; ``zerocopy``: two plain TCP
  legs relayed in the kernel (``splice(2)``); ``eager``: writes and half-closes put on a
  plain TCP socket at once; ``deferreds``: ``fork``.
- ``wsjson``: the JSON-WebSocket session (quiet logger, ``send``/``close``/``violation``);
  ``wsfactory``: the Autobahn factories every WebSocket is built by (timers never
  early, at most 50 ms late).
- ``timers``: ``every``, work repeated at an interval on a given reactor (a child service).
"""
