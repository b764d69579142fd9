"""`tidegate demo` and `tidegate send`: the pipeline seen from a service."""

from __future__ import annotations

import asyncio
import time

from streams import Client, Reply
from streams.config import Settings
from tidegate import devstack

CONVERSATION = [
    "Hi! My name is Ada and I keep bees.",
    "What could I plant near the hives?",
    "What was my name again?",
]
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "What does a thermometer measure?",
    "Which planet is closest to the sun?",
    "What is water made of?",
    "Translate 'thank you' into Spanish.",
    "How many days are in a leap year?",
    "What is the opposite of cold?",
]


def format_reply(reply: Reply) -> str:
    t = reply.timings
    head = (
        f"[{reply.status}] total {t.total_ms} ms (queued {t.queued_ms}, context {t.context_ms}, "
        f"batch wait {t.batch_wait_ms}, inference {t.inference_ms}; "
        f"{reply.tokens_in} in, {reply.tokens_out} out)"
    )
    body = reply.text if reply.ok else (reply.error or "")
    return f"{head}\n  {body.strip()}"


async def _converse(settings: Settings) -> None:
    async with Client(settings=settings) as client:
        print("== a 3-turn conversation (session demo-ada)")
        for turn in CONVERSATION:
            print(f"> {turn}")
            reply = await client.generate([{"role": "user", "content": turn}], "demo-ada", max_new_tokens=48)
            print(format_reply(reply))
        print("== 10 single questions, sent together")
        started = time.monotonic()
        replies = await asyncio.gather(
            *(
                client.generate([{"role": "user", "content": q}], f"demo-q{i}", max_new_tokens=32)
                for i, q in enumerate(QUESTIONS)
            )
        )
        for question, reply in zip(QUESTIONS, replies, strict=True):
            print(f"> {question}")
            print(format_reply(reply))
        print(f"== 10 questions answered in {time.monotonic() - started:.2f} s")


def run_demo(model: str) -> int:
    print(f"starting the embedded stack (model {model}); the first run converts the model once")
    stack = devstack.up(model=model)
    try:
        print(f"broker {stack.bootstrap}, redis {stack.redis_url}")
        asyncio.run(_converse(Settings(bootstrap=stack.bootstrap, redis_url=stack.redis_url)))
    finally:
        stack.stop()
        print("stopped everything the demo started")
    return 0


async def send_one(settings: Settings, text: str, session: str, max_new_tokens: int) -> int:
    async with Client(settings=settings) as client:
        reply = await client.generate([{"role": "user", "content": text}], session, max_new_tokens=max_new_tokens)
    print(format_reply(reply))
    return 0 if reply.ok else 1
