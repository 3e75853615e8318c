"""Acceptance (issue 3, point 4): drive `minillm chat` through a pseudo-terminal, as a person would:
a question, /system, /reset, a Ctrl-C in the middle of an answer, /save, /quit; and check what the
screen and the saved conversation show. Also: a conversation that outgrows the context."""

import json
import sys

import pytest

import minillm
from minillm.chat import ChatSession
from minillm.generate import SamplingParams

pexpect = pytest.importorskip("pexpect")


def test_chat_repl_session(smollm2_gguf, tmp_path):
    saved = tmp_path / "conversation.json"
    child = pexpect.spawn(sys.executable, ["-m", "minillm", "chat", str(smollm2_gguf), "--temperature", "0",
                                           "--max-new-tokens", "300", "--quiet"],
                          encoding="utf-8", timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                          dimensions=(50, 200))
    transcript = []
    try:
        child.expect("/help for commands")
        child.expect("> ")
        child.sendline("What is the capital of France?")
        child.expect(r"tokens/s\]")
        answer = child.before
        transcript.append(answer)
        assert "Paris" in answer
        child.expect("> ")

        child.sendline("/system You always answer like a pirate.")
        child.expect(r"\(system message set\)")
        child.sendline("/reset")
        child.expect(r"\(conversation cleared\)")
        child.expect("> ")

        child.sendline("Tell me a very long story about a dragon who learns to bake bread.")
        child.expect("bread\\.\r\n")  # our line echoed back
        child.expect(r"\w+ \w+ \w+")  # the answer has started streaming
        shown = child.before + child.after
        child.sendintr()  # Ctrl-C
        child.expect(r"\[stopped\]")
        transcript.append(shown + child.before)
        child.expect("> ")

        child.sendline(f"/save {saved}")
        child.expect(r"\(saved 3 messages")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "You always answer like a pirate."
    assert "dragon" in messages[1]["content"]
    partial = messages[2]["content"]
    assert partial and partial in transcript[1].replace("\r\n", "\n")  # what was shown was kept


def test_ctrl_d_quits_cleanly(smollm2_gguf):
    child = pexpect.spawn(sys.executable, ["-m", "minillm", "chat", str(smollm2_gguf), "--quiet"],
                          encoding="utf-8", timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    child.expect("> ")
    child.sendline("/load /nonexistent/file.json")
    child.expect("error: .*not a conversation saved by /save")
    child.expect("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_conversation_outgrowing_context_drops_oldest_turns(smollm2_gguf):
    m = minillm.load(smollm2_gguf, progress=False)
    session = ChatSession(m, SamplingParams(temperature=0, max_new_tokens=24), system="Be brief.", context=96)
    notices_seen = []
    for q in ["What is the capital of France?", "And of Italy?", "And of Spain?", "And of Germany?",
              "And of Portugal?"]:
        notices = []
        reply = "".join(p.text for p in session.ask(q, notices))
        notices_seen += notices
        assert reply
        assert session.cache.length <= 96
    assert any("dropped" in n for n in notices_seen)
    assert session.messages[0] == {"role": "system", "content": "Be brief."}  # the system message stays
    assert session.messages[-2]["content"] == "And of Portugal?"
