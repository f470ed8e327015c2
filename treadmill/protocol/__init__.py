"""Wire types shared by two or more roles.

Modules: ``supervisor`` (the switchboard ↔ supervisor protocol, ``schemas/supervisor-v1.json``),
``proxy`` (the proxy control protocol and data header, ``schemas/proxy-control-v1.json``),
``logs`` (log stream names, the log server's URLs and close codes), ``agent`` (the agent
channel), ``results`` (the results line format).
"""
