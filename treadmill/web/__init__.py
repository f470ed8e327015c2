"""The web console's assets, served by the switchboard (``docs/console.md``).

``index.html``, the ES modules (``app.js``, ``api.js``, ``dom.js``, ``logs.js``,
``terminal.js``, ``pages/*.js``), ``style.css`` and ``vendor/xterm/`` (xterm.js,
vendored by ``tools/vendor-xterm``). No build step, nothing loaded from elsewhere.
"""
