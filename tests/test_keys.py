"""CURVE keys: files, loading, and real loopback sockets that refuse unauthorized clients."""

from __future__ import annotations

import stat

import pytest
import zmq

from partita.errors import AuthError
from partita.runtime import keys

REFUSAL_WAIT_MS = 600  # how long a refused client gets to (not) deliver; a handshake on loopback takes ~ms


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    keys.stop_auth(context)
    context.destroy(linger=0)


def _server(ctx, secret, authorized, kind=zmq.ROUTER):
    sock = ctx.socket(kind)
    sock.linger = 0
    keys.apply_server(sock, secret, authorized)
    sock.bind("tcp://127.0.0.1:0")
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _client(ctx, secret, server_public, endpoint):
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    keys.apply_client(sock, secret, server_public)
    sock.connect(endpoint)
    return sock


def _received(sock, timeout_ms):
    if sock.poll(timeout_ms, zmq.POLLIN):
        return sock.recv_multipart(copy=False)
    return None


def test_new_keypair_writes_standard_certificate_files_with_private_secret(tmp_path):
    public_path, secret_path = keys.new_keypair(tmp_path / "k", "pi-a")

    assert public_path.name == "pi-a.key" and secret_path.name == "pi-a.key_secret"
    public, secret = keys.load_secret(secret_path)
    assert keys.load_public_keys(public_path) == [public]
    assert zmq.auth.load_certificate(str(public_path))[1] is None
    assert len(secret) == 40
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600


def test_new_keypair_refuses_to_overwrite_an_existing_pair(tmp_path):
    keys.new_keypair(tmp_path, "w")
    with pytest.raises(AuthError, match="already exists"):
        keys.new_keypair(tmp_path, "w")
    keys.new_keypair(tmp_path, "w", overwrite=True)


def test_load_public_keys_reads_every_key_file_of_a_directory(tmp_path):
    a, _ = keys.new_keypair(tmp_path, "a")
    b, _ = keys.new_keypair(tmp_path, "b")

    loaded = keys.load_public_keys(tmp_path)

    assert sorted(loaded) == sorted(keys.load_public_keys(a) + keys.load_public_keys(b))


def test_loading_bad_key_files_raises_auth_error(tmp_path):
    public_path, _ = keys.new_keypair(tmp_path, "x")
    (tmp_path / "junk.key").write_text("not a certificate\n")
    with pytest.raises(AuthError, match="only a public key"):
        keys.load_secret(public_path)
    with pytest.raises(AuthError, match="does not exist"):
        keys.load_secret(tmp_path / "missing.key_secret")
    with pytest.raises(AuthError, match="not a ZeroMQ certificate"):
        keys.load_public_keys(tmp_path / "junk.key")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AuthError, match=r"no \*\.key files"):
        keys.load_public_keys(tmp_path / "empty")


def test_insecure_is_an_explicit_choice_never_a_fallback(ctx):
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    with pytest.raises(AuthError, match="--insecure"):
        keys.apply_server(sock, None, [keys.ephemeral_keypair()[0]])
    with pytest.raises(AuthError, match="--insecure"):
        keys.apply_client(sock, None, keys.ephemeral_keypair()[0])
    with pytest.raises(AuthError, match="choose one"):
        keys.apply_server(sock, keys.ephemeral_keypair(), None, insecure=True)

    assert keys.apply_server(sock, None, None, insecure=True) is None
    assert sock.curve_server == 0


def test_server_refuses_empty_or_malformed_authorized_keys(ctx):
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    with pytest.raises(AuthError, match="empty"):
        keys.apply_server(sock, keys.ephemeral_keypair(), [])
    with pytest.raises(AuthError, match="40 z85"):
        keys.apply_server(sock, keys.ephemeral_keypair(), [b"short"])


@pytest.mark.slow
def test_unauthorized_client_gets_nothing_through_and_authorized_client_does(ctx, tmp_path):
    server_pub, server_sec = keys.new_keypair(tmp_path, "server")
    good_pub, good_sec = keys.new_keypair(tmp_path / "ok", "coordinator")
    _, bad_sec = keys.new_keypair(tmp_path / "other", "intruder")
    server, endpoint = _server(ctx, server_sec, tmp_path / "ok")

    intruder = _client(ctx, bad_sec, server_pub, endpoint)
    intruder.send(b"deploy from intruder")
    assert _received(server, REFUSAL_WAIT_MS) is None

    friend = _client(ctx, good_sec, server_pub, endpoint)
    friend.send(b"deploy from coordinator")
    got = _received(server, 5000)
    assert got is not None and got[-1].bytes == b"deploy from coordinator"
    assert keys.peer_key(got[-1]) == keys.load_public_keys(good_pub)[0]
    assert _received(server, 200) is None  # the intruder's queued message never arrives
    stats = keys.auth_stats(server)
    assert stats["accepted"] >= 1 and stats["refused"] >= 1


@pytest.mark.slow
def test_plain_client_and_wrong_server_key_get_nothing_through(ctx):
    server_pair = keys.ephemeral_keypair()
    client_pair = keys.ephemeral_keypair()
    server, endpoint = _server(ctx, server_pair, [client_pair[0]])

    plain = ctx.socket(zmq.DEALER)
    plain.linger = 0
    plain.connect(endpoint)
    plain.send(b"no curve at all")
    impostor_view = _client(ctx, client_pair, keys.ephemeral_keypair()[0], endpoint)
    impostor_view.send(b"wrong server key")

    assert _received(server, REFUSAL_WAIT_MS) is None


@pytest.mark.slow
def test_set_authorized_admits_a_new_peer_and_separate_sockets_keep_separate_sets(ctx):
    server_pair = keys.ephemeral_keypair()
    first, second = keys.ephemeral_keypair(), keys.ephemeral_keypair()
    control, control_ep = _server(ctx, server_pair, [first[0]])
    data, data_ep = _server(ctx, server_pair, [second[0]])

    early = _client(ctx, first, server_pair[0], data_ep)
    early.send(b"first on data")
    assert _received(data, REFUSAL_WAIT_MS) is None

    keys.set_authorized(data, [first[0], second[0]])
    late = _client(ctx, first, server_pair[0], data_ep)
    late.send(b"first on data again")
    got = _received(data, 5000)
    assert got is not None and got[-1].bytes == b"first on data again"

    stranger = _client(ctx, second, server_pair[0], control_ep)
    stranger.send(b"second on control")
    assert _received(control, REFUSAL_WAIT_MS) is None
    stats = keys.auth_stats(control)
    assert stats["accepted"] == 0 and stats["refused"] >= 1


def test_keys_new_command_writes_the_pair_and_refuses_to_overwrite(tmp_path):
    from typer.testing import CliRunner

    from partita.commands import keys as keys_cmd

    first = CliRunner().invoke(keys_cmd.app, ["new", str(tmp_path), "coordinator"])
    again = CliRunner().invoke(keys_cmd.app, ["new", str(tmp_path), "coordinator"])

    assert first.exit_code == 0, first.output
    assert (tmp_path / "coordinator.key").is_file() and (tmp_path / "coordinator.key_secret").is_file()
    assert isinstance(again.exception, AuthError)


def test_insecure_sockets_are_reported_once_per_process(caplog):
    import zmq

    from partita.runtime import keys
    from partita.runtime.keys import apply_client

    keys._insecure_said.clear()  # noqa: SLF001 - the once-per-process latch, reset for this test
    ctx = zmq.Context.instance()
    sockets = [ctx.socket(zmq.DEALER) for _ in range(3)]
    try:
        with caplog.at_level("WARNING", logger="partita.runtime.keys"):
            for sock in sockets:
                apply_client(sock, None, None, insecure=True)
    finally:
        for sock in sockets:
            sock.close(linger=0)
    warnings = [r for r in caplog.records if "insecure" in r.getMessage()]
    assert len(warnings) == 1
