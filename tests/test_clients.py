"""replan.clients: endpoint settings, error messages, the attempt budget and one async client per event loop (the
planner, judge and reward tests drive the same code against local servers)."""

from __future__ import annotations

import asyncio

import pytest

from replan.clients import PerLoop, RetryBudget, chat_text, endpoint_url, error_message, json_object, one_line


def test_endpoint_url_from_argument_or_environment(monkeypatch):
    monkeypatch.delenv("A_URL", raising=False)
    monkeypatch.setenv("B_URL", "http://host:8000/v1/")
    assert endpoint_url(None, "planner", ("A_URL", "B_URL"), "pass --base_url") == "http://host:8000/v1"
    assert endpoint_url(" https://x/v1 ", "planner", ("A_URL",), "pass --base_url") == "https://x/v1"
    monkeypatch.delenv("B_URL")
    with pytest.raises(ValueError, match=r"^no judge endpoint: pass --base_url or set A_URL \(or B_URL\)") as info:
        endpoint_url(None, "judge", ("A_URL", "B_URL"), "pass --base_url")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="http"):
        endpoint_url("localhost:8000", "judge", ("A_URL",), "pass --base_url")


@pytest.mark.parametrize(("body", "message"), [
    (b'{"error": {"message": "model  not\\nfound"}}', "model not found"),   # OpenAI
    (b'{"object": "error", "message": "too long", "code": 400}', "too long"),  # vLLM
    (b'{"detail": [{"loc": ["body"]}]}', '[{"loc": ["body"]}]'),            # FastAPI validation
    (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
])
def test_error_message_reads_the_usual_error_bodies(body, message):
    assert error_message(body) == message


def test_one_line_cuts_long_text():
    assert one_line("a\n b\t c") == "a b c"
    assert one_line("x" * 500, 20) == "x" * 17 + "..."


def test_reply_reading():
    assert chat_text({"choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"text": "b"}]}}]}) == "ab"
    for bad in ({"choices": []}, {"choices": [{"message": {"content": None}}]}, {"error": {"message": "busy"}}):
        with pytest.raises(Exception, match="reply"):
            chat_text(bad)
    with pytest.raises(Exception, match="not valid JSON"):
        json_object(b"<html>")
    with pytest.raises(Exception, match="JSON list"):
        json_object(b"[1]")


def test_retry_budget_counts_every_request_and_doubles_its_pause():
    budget = RetryBudget(max_retries=4, backoff=0.5, max_backoff=1.5)
    assert (budget.total, budget.left, budget.sdk_retries()) == (5, 5, 4)
    budget.spend(3)  # the SDK retried twice inside one call
    assert (budget.used, budget.left, budget.sdk_retries()) == (3, 2, 1)
    assert [budget.delay(), budget.delay(), budget.delay()] == [0.5, 1.0, 1.5]
    assert budget.delay(retry_after=9.0) == 1.5  # a server's Retry-After, capped
    budget.spend(0)  # a call is at least one request
    assert budget.left == 1


def test_per_loop_makes_one_value_per_event_loop_and_closes_it():
    closed = []

    class Client:
        async def aclose(self):
            closed.append(self)

    per_loop = PerLoop(Client)

    async def twice():
        return per_loop.get(), per_loop.get()

    a, b = asyncio.run(twice())
    c, _ = asyncio.run(twice())
    assert a is b and c is not a

    async def use_and_close():
        value = per_loop.get()
        await per_loop.aclose()
        return value, per_loop.get()

    first, again = asyncio.run(use_and_close())
    assert closed == [first] and again is not first
