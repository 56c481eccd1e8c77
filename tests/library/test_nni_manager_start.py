"""Specification of how long sweep.py --engine nni lets NNI's manager start
(nni_engine.patient_launcher).

Until NNI 3.0's manager has mounted its REST handlers, it answers /check-status with the
plain word INITIALIZING; NNI's launcher reads the answer as JSON and gives up after three
tries a second apart. On a busy machine the start then failed with "Expecting value: line 1
column 1 (char 0)". A stand-in manager that answers so for READY_AFTER seconds shows the
launcher failing alone and waiting under the mend.
"""
import http.server
import threading
import time

import pytest

from compress.sweep import nni_engine

READY_AFTER = 4.0  # seconds: longer than the three tries NNI's launcher makes


class SlowManager(http.server.BaseHTTPRequestHandler):
    started = 0.0

    def do_GET(self):  # noqa: N802 (http.server's name)
        ready = time.monotonic() - self.started >= READY_AFTER
        body = b'{"status": "RUNNING"}' if ready else b"INITIALIZING"
        self.send_response(200)
        self.send_header("Content-Type", "application/json" if ready else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_manager():
    """The port of a manager that initializes for READY_AFTER seconds from now."""
    from nni.experiment import launcher  # noqa: F401 (imported first: it takes seconds)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowManager)
    SlowManager.started = time.monotonic()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_nnis_launcher_alone_fails_on_a_manager_still_initializing(slow_manager):
    from nni.experiment import launcher

    with pytest.raises(ValueError, match="Expecting value: line 1 column 1"):
        launcher._check_rest_server(slow_manager)


def test_under_the_mend_it_waits_for_the_first_json_answer(slow_manager):
    from nni.experiment import launcher

    original = launcher._check_rest_server
    with nni_engine.patient_launcher(30):
        launcher._check_rest_server(slow_manager)
        waited = time.monotonic() - SlowManager.started
    assert READY_AFTER <= waited < READY_AFTER + 5
    assert launcher._check_rest_server is original  # NNI's own again afterwards


def test_under_the_mend_a_manager_that_never_answers_still_fails(slow_manager):
    from nni.experiment import launcher

    begun = time.monotonic()
    with nni_engine.patient_launcher(1), pytest.raises(ValueError, match="Expecting value"):
        launcher._check_rest_server(slow_manager)
    assert time.monotonic() - begun < READY_AFTER
