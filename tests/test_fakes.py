"""Each fake stands for something the product declares: its interface, or its class's
methods (the image fetchers: no interface is declared for them)."""

from __future__ import annotations

import pytest

from tests.fakes.conformance import check_interface, check_methods
from tests.fakes.fetcher import StubFetcher
from tests.fakes.reporter import Recorder
from tests.supervisor.qemu.conftest import FakeFetcher as QemuFetcher
from tests.supervisor.serial.support import FakeFetcher as BoardFetcher
from treadmill.supervisor.drivers import IJobReporter
from treadmill.supervisor.fetch import ImageFetcher


def test_the_recorder_is_a_job_reporter() -> None:
    check_interface(IJobReporter, Recorder)


@pytest.mark.parametrize("fake", [QemuFetcher, BoardFetcher, StubFetcher],
                         ids=lambda f: f.__module__.rsplit(".", 1)[-1] + "." + f.__name__)
def test_fake_fetchers_have_the_image_fetchers_methods(fake: type) -> None:
    names = [n for n in ("can_fetch", "fetch", "release", "pin", "release_digests")
             if hasattr(fake, n)]
    check_methods(fake, ImageFetcher, names)
