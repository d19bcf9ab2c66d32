"""Secure aggregation: Shamir, the masked sum, equality with plain aggregation, privacy, and dropouts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from partita.errors import FLError, WorkerError
from partita.fl import ClientProfile, FedAvg, FedNova, FLServer, InProcessClient, get_task
from partita.fl.secagg import masking, shamir
from partita.fl.secagg.client import SecureSession
from partita.fl.secagg.participant import LocalSecureClient, flat_delta
from partita.fl.secagg.round import SecureAggregation, secure_round
from partita.fl.update import weights_of

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine threads oversubscribe.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_any_threshold_shares_recover_the_secret_and_fewer_do_not():
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    assert shamir.combine({x: shares[x] for x in (5, 1, 3)}, 3) == secret
    assert shamir.combine({x: shares[x] for x in (2, 4, 5)}, 3) == secret
    with pytest.raises(FLError, match="cannot recover"):
        shamir.combine({x: shares[x] for x in (1, 2)}, 3)
    # Read as a 2-of-n sharing, two shares interpolate to a random field element (below 2^256 with
    # probability 2^-265): they say nothing about the secret.
    with pytest.raises(FLError, match="inconsistent"):
        shamir.combine({x: shares[x] for x in (1, 2)}, 2)


def test_the_ring_round_trips_within_half_a_step_and_refuses_what_would_overflow():
    values = np.array([0.0, 1.5, -2.25, 1e-12, -123456.789])
    back = masking.dequantize(masking.quantize(values))
    assert np.max(np.abs(back - values)) <= masking.quantization_bound(1)
    with pytest.raises(FLError, match="fixed-point ring"):
        masking.quantize(np.array([2.0**40]))
    with pytest.raises(FLError):
        masking.quantize(np.array([np.nan]))


def _sessions(count: int, size: int = 500, seed: int = 0):
    rng = np.random.default_rng(seed)
    deltas = {u: rng.normal(size=size) for u in range(count)}
    sessions = {u: SecureSession(u, b"round", deltas[u]) for u in range(count)}
    roster = [sessions[u].advertise() for u in range(count)]
    outboxes = {u: sessions[u].share_keys(roster, 3) for u in range(count)}
    inbox = {v: {u: outboxes[u][v] for u in range(count) if u != v} for v in range(count)}
    return deltas, sessions, roster, inbox


def test_a_client_refuses_to_reveal_both_secrets_of_one_client_or_to_unmask_below_the_threshold():
    _, sessions, _, inbox = _sessions(5)
    for u in range(5):
        sessions[u].masked_input(inbox[u], [1.0], list(range(5)))
    with pytest.raises(FLError, match="same client"):
        sessions[0].unmask([0, 1, 2], [2])
    with pytest.raises(FLError, match="threshold"):
        sessions[0].unmask([0, 1], [2, 3, 4])


def test_a_share_altered_on_the_way_fails_authentication():
    _, sessions, _, inbox = _sessions(4)
    tampered = dict(inbox[1])
    tampered[0] = tampered[0][:-1] + bytes([tampered[0][-1] ^ 1])
    with pytest.raises(FLError, match="authentication"):
        sessions[1].masked_input(tampered, [1.0], [0, 1, 2, 3])


# --- Whole rounds, in process -------------------------------------------------------------------------------

PROFILES = {i: ClientProfile(local_steps=2 + 6 * i, lr=0.05) for i in range(5)}


@pytest.mark.parametrize("strategy", [FedAvg, FedNova])
def test_secure_training_ends_where_plain_training_does_within_the_quantisation_bound(strategy):
    task = get_task("digits", num_clients=5, seed=0, alpha=0.3)
    plain = FLServer(strategy(), [InProcessClient(task, i) for i in range(5)], profiles=PROFILES)
    secure = FLServer(
        strategy(), [LocalSecureClient(InProcessClient(task, i)) for i in range(5)], profiles=PROFILES,
        secure=SecureAggregation(),
    )
    # Round by round from the same global weights (each server keeps its own momentum buffer): the unmasked sums
    # are within 5 * 2^-33 of the float64 sums (masking.quantization_bound) and the weights are float32, so what
    # can differ is the last bit or two of a weight: 1e-6 holds with room. (Chained over rounds, such a last-bit
    # difference can move the next round's realised work of a client by 1e-5 relative: FedNova's normaliser
    # comes from one minibatch gradient at the round's start, which is not a smooth function of the weights.)
    weights = weights_of(task.model())
    for round_number in range(1, 4):
        expected, plain_record = plain.run_round(round_number, weights)
        got, secure_record = secure.run_round(round_number, weights)
        for name, tensor in expected.items():
            assert torch.allclose(got[name], tensor, rtol=0, atol=1e-6), (round_number, name)
        assert secure_record.clients == plain_record.clients and secure_record.steps == plain_record.steps
        weights = expected


class Dropping(LocalSecureClient):
    """A client that is lost at one stage of the protocol (the handle raises, as a dead worker's would)."""

    def __init__(self, client, stage: str) -> None:
        super().__init__(client)
        self.stage = stage

    def secure_mask(self, *args):
        if self.stage == "mask":
            raise WorkerError(f"client {self.client_id} died before sending its masked input")
        return super().secure_mask(*args)

    def secure_unmask(self, *args):
        if self.stage == "unmask":
            raise WorkerError(f"client {self.client_id} died before unmasking")
        return super().secure_unmask(*args)


def _round(task, clients, strategy, weights):
    server = FLServer(strategy, clients, profiles=PROFILES, secure=SecureAggregation(), evaluate=lambda w: {})
    configs = [server.configure(c, 1) for c in clients]
    return secure_round(
        strategy, clients, configs, weights, settings=SecureAggregation(), lost_errors=(WorkerError,)
    )


@pytest.mark.parametrize("stages", [("mask",), ("mask", "unmask")])
def test_clients_lost_after_sharing_their_keys_leave_the_sum_of_the_others(stages):
    task = get_task("digits", num_clients=5, seed=1, alpha=0.3)
    weights = weights_of(task.model())
    clients = [LocalSecureClient(InProcessClient(task, i)) for i in range(5)]
    for index, stage in zip((1, 3), stages, strict=False):
        clients[index] = Dropping(InProcessClient(task, index), stage)
    result = _round(task, clients, FedNova(), weights)

    lost_before_masking = {1} if "mask" in stages else set()
    assert set(result.dropped) == lost_before_masking | ({3} if "unmask" in stages else set())
    survivors = [i for i in range(5) if i not in lost_before_masking]
    assert [cid for cid, _ in result.answered] == survivors
    # The same aggregation in the clear, over the same updates of the survivors:
    config = FLServer(FedNova(), clients, profiles=PROFILES).configure
    updates = [InProcessClient(task, i).train(weights, config(clients[i], 1)) for i in survivors]
    expected = FedNova().aggregate(weights, updates)
    for name, tensor in expected.items():
        assert torch.allclose(result.weights[name], tensor, rtol=0, atol=1e-6), name


def test_too_many_losses_leave_the_weights_unchanged_and_say_why():
    task = get_task("digits", num_clients=5, seed=1, alpha=0.3)
    weights = weights_of(task.model())
    clients = [Dropping(InProcessClient(task, i), "mask" if i < 3 else "") for i in range(5)]
    result = _round(task, clients, FedAvg(), weights)
    assert all(torch.equal(result.weights[n], weights[n]) for n in weights)
    assert "threshold" in result.dropped[4] and not result.answered


def test_what_the_server_holds_reveals_no_single_clients_update():
    task = get_task("digits", num_clients=5, seed=2, alpha=0.3)
    weights = weights_of(task.model())
    clients = [LocalSecureClient(InProcessClient(task, i)) for i in range(5)]
    clients[4] = Dropping(InProcessClient(task, 4), "mask")  # so the server also rebuilds a mask key
    result = _round(task, clients, FedNova(), weights)
    seen = result.transcript
    threshold = SecureAggregation().threshold_for(5)
    config = FLServer(FedNova(), clients, profiles=PROFILES).configure
    for cid in (0, 1, 2, 3):
        update = InProcessClient(task, cid).train(weights, config(clients[cid], 1))
        scales = FedNova().client_weights([seen.reports[i] for i in range(5)])[cid]
        clear = masking.quantize(np.concatenate([w * flat_delta(weights, update.weights) for w in scales]))
        received = seen.masked[cid]
        # Even after the server removes the self mask (it may rebuild every survivor's seed), the pairwise
        # masks remain: it never holds threshold shares of a survivor's mask key.
        holders = [r for r, keys in seen.key_shares.items() if cid in keys]
        assert len(holders) < threshold
        seed = shamir.combine({r + 1: s[cid] for r, s in seen.seed_shares.items()}, threshold)
        with np.errstate(over="ignore"):
            unmasked_once = received - masking.mask(seed, received.size)
        for candidate in (received, unmasked_once):
            differ = candidate != clear
            assert differ.mean() > 0.999
            bits = np.unpackbits(candidate.view(np.uint8))
            assert abs(bits.mean() - 0.5) < 0.01  # looks like uniform noise, bit by bit
            correlation = np.corrcoef(masking.dequantize(candidate), masking.dequantize(clear))[0, 1]
            assert abs(correlation) < 0.1
    # Scalars are all it learns in the clear (n_i, tau_i, solver, a_norm): the masked inputs carry the rest.
    assert set(seen.reports) == {0, 1, 2, 3, 4}
