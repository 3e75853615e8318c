"""The chat REPL: `minillm chat [MODEL]`.

The conversation is a list of messages rendered by the model's chat template each turn. The KV cache
is kept between turns: each new prompt shares a prefix with what the cache holds (the conversation
so far), so only the new tokens are run through the model. When a conversation outgrows the
context, the oldest turns are dropped (the system message stays) and the user is told.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from .errors import MinillmError
from .generate import SamplingParams, stream_generate

HELP = """commands:
  /system TEXT   set the system message (keeps the conversation)
  /reset         forget the conversation (keeps the system message)
  /save FILE     write the conversation to FILE as JSON
  /load FILE     read a conversation written by /save
  /help          this text
  /quit          leave (Ctrl-D too); Ctrl-C stops an answer"""

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BUILTIN_TEMPLATES = {"chatml": CHATML}


def read_template(choice: str | None) -> str | None:
    """--template: a built-in name (chatml) or a Jinja file."""
    if choice is None:
        return None
    if choice in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[choice]
    path = Path(choice)
    if not path.is_file():
        raise MinillmError(f"--template {choice!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a file")
    return path.read_text()


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with one model, keeping its KV cache across turns."""

    def __init__(self, m, params: SamplingParams, system: str | None = None, template: str | None = None,
                 context: int | None = None):
        self.m, self.params, self.template = m, params.validate(), template
        self.tok = m.require_tokenizer()
        self.tok.render_chat([{"role": "user", "content": "hi"}], template=template)  # fail early if none
        self.system = system
        self.turns: list[dict] = []
        self.cache = m.new_cache(max_len=min(context or m.model.context_length, m.model.context_length))
        self.cache_ids: list[int] = []

    @property
    def messages(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.turns

    def reset(self):
        self.turns = []

    def save(self, path: str):
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=".chat-", dir=target.parent if str(target.parent) else ".")
        with os.fdopen(fd, "w") as f:
            json.dump({"messages": self.messages}, f, indent=2, ensure_ascii=False)
        os.replace(tmp, target)

    def load(self, path: str):
        try:
            data = json.loads(Path(path).read_text())
            messages = data["messages"]
            assert all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
            raise MinillmError(f"{path} is not a conversation saved by /save ({exc.__class__.__name__})") from exc
        self.system = next((m["content"] for m in messages if m["role"] == "system"), None)
        self.turns = [m for m in messages if m["role"] != "system"]

    def _prompt_ids(self, notices: list[str]) -> list[int]:
        """The prompt for the conversation, dropping the oldest turns until it leaves room to answer."""
        room = min(self.params.max_new_tokens, self.cache.max_len // 4)
        dropped = 0
        while True:
            ids = self.tok.encode_chat(self.messages, template=self.template)
            if len(ids) + room <= self.cache.max_len or len(self.turns) <= 1:
                break
            self.turns.pop(0)
            dropped += 1
            while self.turns and self.turns[0]["role"] != "user":
                self.turns.pop(0)
                dropped += 1
        if dropped:
            notices.append(f"(the conversation outgrew the {self.cache.max_len}-token context: "
                           f"dropped the {dropped} oldest messages)")
        if len(ids) >= self.cache.max_len:
            self.turns.pop()
            raise MinillmError(f"that message is {len(ids)} tokens with the template; the context holds "
                               f"{self.cache.max_len}. Send something shorter.")
        return ids

    def ask(self, text: str, notices: list[str] | None = None):
        """Stream the reply to `text` as Pieces; the (possibly partial) reply joins the conversation."""
        notices = notices if notices is not None else []
        self.turns.append({"role": "user", "content": text})
        ids = self._prompt_ids(notices)
        self.cache.truncate(_common_prefix(self.cache_ids, ids))
        reply = []
        last = None
        try:
            for piece in stream_generate(self.m.model, self.tok, ids, self.params, cache=self.cache):
                reply.append(piece.text)
                last = piece
                yield piece
        finally:  # also on Ctrl-C: the partial answer stays in the conversation
            self.turns.append({"role": "assistant", "content": "".join(reply)})
            generated = last.tokens if last is not None and last.tokens else []
            self.cache_ids = (ids + generated)[: self.cache.length]


def repl(m, params: SamplingParams, system=None, template=None, context=None, out=sys.stdout) -> int:
    session = ChatSession(m, params, system, template, context)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401, PLC0415 - line editing and history for input()
        except ImportError:
            pass
    print(f"minillm chat with {m.name} (context {session.cache.max_len} tokens). /help for commands.", file=out)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit to leave)", file=out)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            try:
                if cmd in ("/quit", "/exit"):
                    return 0
                elif cmd == "/help":
                    print(HELP, file=out)
                elif cmd == "/reset":
                    session.reset()
                    print("(conversation cleared)", file=out)
                elif cmd == "/system":
                    session.system = arg.strip() or None
                    print("(system message set)" if session.system else "(system message removed)", file=out)
                elif cmd == "/save" and arg.strip():
                    session.save(arg.strip())
                    print(f"(saved {len(session.messages)} messages to {arg.strip()})", file=out)
                elif cmd == "/load" and arg.strip():
                    session.load(arg.strip())
                    print(f"(loaded {len(session.messages)} messages)", file=out)
                else:
                    print(f"unknown command {line!r}: /help lists them", file=out)
            except (MinillmError, OSError) as exc:
                print(f"error: {exc}", file=out)
            continue
        notices: list[str] = []
        last = None
        try:
            for piece in session.ask(line, notices):
                for n in notices:
                    print(n, file=out)
                notices.clear()
                print(piece.text, end="", flush=True, file=out)
                last = piece
        except KeyboardInterrupt:
            print("\n[stopped]", file=out)
            continue
        except MinillmError as exc:
            print(f"error: {exc}", file=out)
            continue
        print(file=out)
        if last is not None:
            print(f"[{last.generated_tokens} tokens, first token after {last.ttft_s:.2f} s, "
                  f"{last.decode_tokens_per_s:.1f} tokens/s]", file=out)
