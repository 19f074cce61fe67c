import os
import sys
import threading

import pytest

from segsynth.cpu import lower_this_thread_priority


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_only_the_calling_thread_is_lowered():
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def helper():
        lower_this_thread_priority()
        seen["helper"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=helper)
    thread.start()
    thread.join()
    assert seen["helper"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before
