"""The test receiver answers as told, records what it answered, and verifies signatures."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from delivery.errors import InputError
from delivery.signing import generate_secret, secret_key, webhook_headers
from delivery.testing.receiver import Behaviour, Receiver

BODY = b'{"id":"evt_1","type":"account.created"}'


def signed(secret: str, webhook_id: str = "evt_1", body: bytes = BODY) -> dict[str, str]:
    return webhook_headers([secret_key(secret)], webhook_id, int(time.time()), body)


async def post_many(
    http: aiohttp.ClientSession, url: str, count: int, body: bytes = BODY
) -> list[int]:
    statuses = []
    for n in range(count):
        async with http.post(url, data=body, headers={"webhook-id": f"evt_{n}"}) as response:
            statuses.append(response.status)
    return statuses


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def test_answers_200_by_default_and_records_the_request(http):
    async with Receiver() as receiver:
        headers = {"webhook-id": "evt_1", "webhook-timestamp": "1700000000"}
        before = time.time()
        async with http.post(receiver.url("/a"), data=BODY, headers=headers) as response:
            assert response.status == 200

        (arrival,) = receiver.arrivals
        assert (arrival.path, arrival.webhook_id, arrival.webhook_timestamp) == (
            "/a",
            "evt_1",
            "1700000000",
        )
        assert arrival.body == BODY
        assert arrival.status == 200
        assert arrival.signature_ok is None  # no secret registered for /a
        assert before <= arrival.arrived_at <= time.time()
        assert receiver.url("/a").startswith("http://127.0.0.1:")
        assert receiver.port > 0


async def test_answers_the_configured_status_and_only_2xx_counts_as_delivered(http):
    async with Receiver() as receiver:
        receiver.set_behaviour("/down", Behaviour(status=503))

        assert await post_many(http, receiver.url("/down"), 2) == [503, 503]
        assert await post_many(http, receiver.url("/up"), 1) == [200]

        assert [a.status for a in receiver.arrivals] == [503, 503, 200]
        assert [a.path for a in receiver.delivered()] == ["/up"]
        assert receiver.delivered("/down") == []
        assert receiver.unique_ids() == {"evt_0"}


async def test_fail_rate_is_repeatable_with_a_seed(http):
    async def run_once() -> list[int]:
        async with Receiver() as receiver:
            receiver.set_behaviour("/f", Behaviour(fail_rate=0.5, fail_status=502, seed=42))
            return await post_many(http, receiver.url("/f"), 40)

    first, second = await run_once(), await run_once()

    assert first == second
    assert set(first) == {200, 502}
    assert 8 <= first.count(502) <= 32  # about half


async def test_setting_a_behaviour_again_restarts_its_failure_sequence(http):
    async with Receiver() as receiver:
        behaviour = Behaviour(fail_rate=0.3, seed=5)
        receiver.set_behaviour("/f", behaviour)
        first = await post_many(http, receiver.url("/f"), 20)
        receiver.set_behaviour("/f", behaviour)
        second = await post_many(http, receiver.url("/f"), 20)

    assert first == second


async def test_retry_after_goes_with_failures_only(http):
    async with Receiver() as receiver:
        receiver.set_behaviour(
            "/busy", Behaviour(fail_rate=0.5, fail_status=429, retry_after="7", seed=1)
        )
        answers = []
        for _ in range(20):
            async with http.post(receiver.url("/busy"), data=BODY) as response:
                answers.append((response.status, response.headers.get("retry-after")))

    assert {(429, "7"), (200, None)} == set(answers)


async def test_delay_holds_the_answer(http):
    async with Receiver() as receiver:
        receiver.set_behaviour("/slow", Behaviour(delay_s=0.3))
        began = time.monotonic()
        async with http.post(receiver.url("/slow"), data=BODY) as response:
            assert response.status == 200
        assert time.monotonic() - began >= 0.3


async def test_hang_never_answers_and_the_client_times_out(http):
    async with Receiver() as receiver:
        receiver.set_behaviour("/hang", Behaviour(hang=True))
        timeout = aiohttp.ClientTimeout(total=0.3)

        with pytest.raises(asyncio.TimeoutError):
            async with http.post(receiver.url("/hang"), data=BODY, timeout=timeout):
                pass

        (arrival,) = receiver.arrivals
        assert arrival.status is None  # recorded, never answered
        assert receiver.delivered() == []


async def test_a_client_giving_up_during_a_delay_is_recorded_as_never_answered(http):
    async with Receiver() as receiver:
        receiver.set_behaviour("/slow", Behaviour(delay_s=5))

        with pytest.raises(asyncio.TimeoutError):
            async with http.post(
                receiver.url("/slow"), data=BODY, timeout=aiohttp.ClientTimeout(total=0.2)
            ):
                pass

        await receiver.wait_for(lambda r: len(r.arrivals) == 1, 5, "the abandoned request")
        assert receiver.arrivals[0].status is None
        assert receiver.delivered() == []


async def test_a_real_signature_verifies(http):
    secret = generate_secret()
    async with Receiver() as receiver:
        receiver.expect_secret("/signed", secret)
        async with http.post(receiver.url("/signed"), data=BODY, headers=signed(secret)) as r:
            assert r.status == 200

        assert receiver.arrivals[0].signature_ok is True


async def test_any_one_of_several_signatures_verifies(http):
    old, new = generate_secret(), generate_secret()
    async with Receiver() as receiver:
        receiver.expect_secret("/signed", new)
        headers = webhook_headers(
            [secret_key(old), secret_key(new)], "evt_1", int(time.time()), BODY
        )
        async with http.post(receiver.url("/signed"), data=BODY, headers=headers):
            pass

        assert " " in headers["webhook-signature"]
        assert receiver.arrivals[0].signature_ok is True


async def test_a_wrong_signature_or_tampered_body_is_recorded_as_failed(http):
    secret = generate_secret()
    async with Receiver() as receiver:
        receiver.expect_secret("/signed", secret)
        wrong_key = signed(generate_secret(), webhook_id="evt_wrong_key")
        tampered = signed(secret, webhook_id="evt_tampered")
        async with http.post(receiver.url("/signed"), data=BODY, headers=wrong_key):
            pass
        async with http.post(receiver.url("/signed"), data=BODY + b" ", headers=tampered):
            pass
        async with http.post(receiver.url("/signed"), data=BODY):  # unsigned
            pass

        assert [a.signature_ok for a in receiver.arrivals] == [False, False, False]


def test_a_malformed_secret_is_refused_when_registered():
    receiver = Receiver()
    with pytest.raises(InputError, match="whsec_"):
        receiver.expect_secret("/x", "whsec_not base64!")


async def test_unique_ids_and_duplicates_count_2xx_answers_only(http):
    async with Receiver() as receiver:
        for webhook_id in ("evt_a", "evt_a", "evt_a", "evt_b"):
            async with http.post(receiver.url("/p"), headers={"webhook-id": webhook_id}):
                pass
        receiver.set_behaviour("/p", Behaviour(status=500))
        async with http.post(receiver.url("/p"), headers={"webhook-id": "evt_b"}):
            pass
        async with http.post(receiver.url("/q"), headers={"webhook-id": "evt_b"}):
            pass

        assert receiver.unique_ids("/p") == {"evt_a", "evt_b"}
        assert receiver.duplicates("/p") == {"evt_a": 3}
        assert receiver.duplicates() == {"evt_a": 3, "evt_b": 2}
        assert receiver.delivered_count() == 5
        assert receiver.delivered_count("/q") == 1
        assert receiver.unique_count("/nowhere") == 0
        assert len(receiver.arrivals) == 6


async def test_wait_for_returns_once_the_predicate_holds(http):
    async with Receiver() as receiver:

        async def send_later() -> None:
            await post_many(http, receiver.url("/w"), 3)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(send_later())
            await receiver.wait_for(lambda r: r.delivered_count("/w") == 3, 5, "three")

        assert len(receiver.unique_ids("/w")) == 3


async def test_wait_for_names_what_it_waited_for_on_timeout():
    async with Receiver() as receiver:
        with pytest.raises(TimeoutError) as caught:
            await receiver.wait_for(lambda r: False, timeout_s=0.1, what="nothing at all")

    assert str(caught.value) == "timed out after 0.1s waiting for nothing at all"


def test_a_behaviour_with_an_impossible_fail_rate_is_refused():
    with pytest.raises(ValueError, match="fail_rate"):
        Behaviour(fail_rate=1.5)
