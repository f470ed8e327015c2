"""Stand-ins for the parts a test does not run for real, each checked against the interface
or class it stands for (``tests/test_fakes.py``).

- ``reporter``: ``Recorder``, a recording ``IJobReporter`` for the host drivers' tests.
- ``fetcher``: ``StubFetcher``, an ``ImageFetcher`` whose fetches the test completes by hand.
- ``conformance``: ``check_interface`` and ``check_methods``, the checks themselves.
"""
