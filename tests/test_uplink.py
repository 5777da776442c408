"""Where an agent sends its results: the collector's port, on the host it reached the broker at."""

from zpar.agent.uplink import collector_address


def test_the_collector_is_reached_the_way_the_backend_was():
    assert collector_address("tcp://*:5557", "tcp://broker.example:5556") == "tcp://broker.example:5557"
    assert collector_address("tcp://10.0.0.5:7000", "tcp://127.0.0.1:5556") == "tcp://127.0.0.1:7000"
    assert collector_address("tcp://*:5557", "tcp://[::1]:5556") == "tcp://[::1]:5557"


def test_an_ipc_collector_is_used_as_it_is():
    assert collector_address("ipc:///run/zpar/collector", "ipc:///run/zpar/backend") == "ipc:///run/zpar/collector"
