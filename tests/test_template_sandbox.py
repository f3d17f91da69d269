"""Chat templates are untrusted code: rendering is bounded in time, memory and output, and every
escape or runaway fails closed with a TemplateError (loading/template_sandbox.py)."""
from __future__ import annotations

import time

import pytest

from mistralrs_jax.errors import TemplateError
from mistralrs_jax.loading.chat_template import ChatTemplate
from mistralrs_jax.loading.template_sandbox import MAX_OUTPUT_CHARS, TemplateWorker, shared_worker

MESSAGES = [{"role": "user", "content": "hi"}]
ENVIRONMENT = "mistralrs_jax.loading.chat_template:_environment"


@pytest.fixture()
def quick_deadline():
    """The shared worker with a 3 s deadline, so a runaway test costs 3 s of CPU, not 10."""
    worker = shared_worker(ENVIRONMENT)
    saved, worker.timeout_s = worker.timeout_s, 3.0
    yield worker
    worker.timeout_s = saved


def render(template: str, **extra) -> str:
    return ChatTemplate(template).render(MESSAGES, **extra)


def test_ordinary_template_renders_as_before():
    text = render("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render("{{ 2 ** 10 }} {{ 'ab' * 3 }} {{ [1] + [2] }} {{ 'x' + 'y' }}") == "1024 ababab [1, 2] xy"


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ range.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ messages[0].__class__ }}",
    "{{ (messages|first).items.__self__.__class__ }}",
    "{{ ''|attr('__class__') }}",
    "{{ self.__init__.__globals__ }}",
    "{{ loop.__class__ }}",
    "{% for x in range(1) %}{{ loop.__init__.__globals__ }}{% endfor %}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ '{0.__class__}'.format_map({'0': ''}) }}",
    "{{ '{x.__init__.__globals__}'.format(x=cycler) }}",
    "{{ '%s'|format(''.__class__) }}",
    "{{ dict.__init__ }}",
    "{{ dict(a=1).__class__ }}",
    "{{ tojson.__globals__ }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{% set ns = namespace(__dict__=1) %}",
    "{{ messages.append(1) }}",  # the immutable sandbox: no mutation of the caller's data
    "{{ messages.pop() }}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{{ ''.__add__ }}",
    "{{ (1).__class__.__subclasses__() }}",
    "{{ cycler().__class__.__init__ }}",
    "{{ joiner().__call__.__func__.__globals__ }}",
]


@pytest.mark.parametrize("attack", ESCAPES)
def test_sandbox_escape_fails_closed(attack):
    with pytest.raises(TemplateError, match="sandbox forbids|unsafe|underscore|error|failed"):
        render(attack)


def test_compile_time_power_bomb_is_not_folded_at_load():
    """`{{ 9**(9**9) }}` is folded by Jinja's optimizer when compiled: loading only parses."""
    start = time.monotonic()
    template = ChatTemplate("{{ 9**(9**9) }}")
    assert time.monotonic() - start < 5
    with pytest.raises(TemplateError, match="too large"):
        template.render(MESSAGES)


@pytest.mark.parametrize("bomb, match", [
    ("{{ n ** (n ** n) }}", "too large"),
    ("{{ 'a' * 10**10 }}", "too large"),
    ("{{ [0] * 10**10 }}", "too large"),
    ("{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
     "too large"),
    ("{{ 'a'|center(3 * 10**9) }}", "memory"),
    ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "memory"),
    ("{% for i in range(99999) %}{{ 'x' * 1000 }}{% endfor %}", f"output passed {MAX_OUTPUT_CHARS}"),
])
def test_resource_bombs_fail_closed(bomb, match, quick_deadline):
    with pytest.raises(TemplateError, match=match):
        render(bomb, n=9)


def test_runaway_loop_is_stopped_at_the_deadline_and_the_worker_recovers(quick_deadline):
    start = time.monotonic()
    with pytest.raises(TemplateError, match="did not finish rendering within 3 s"):
        render("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}")
    assert time.monotonic() - start < 30
    assert render("{{ messages[0].content }}") == "hi"  # a fresh worker answers the next render


def test_syntax_errors_and_nesting_are_reported_at_load():
    with pytest.raises(TemplateError, match="not valid Jinja"):
        ChatTemplate("{% for %}")
    with pytest.raises(TemplateError, match="not valid Jinja|nested too deeply"):
        ChatTemplate("{% if 1 %}" * 5000 + "{% endif %}" * 5000)


def test_a_worker_that_dies_fails_the_render_and_is_replaced():
    import threading

    worker = TemplateWorker(ENVIRONMENT, timeout_s=30.0, memory_limit=1 << 30)
    try:
        assert worker.render("{{ 1 + 1 }}", {}) == "2"
        worker._process.kill()  # died between renders: the next render starts a new worker
        worker._process.wait()
        assert worker.render("{{ 1 + 2 }}", {}) == "3"
        victim = worker._process
        threading.Timer(1.0, victim.kill).start()  # dies during a render
        with pytest.raises(TemplateError, match="was stopped"):
            worker.render("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", {})
        assert worker.render("{{ 2 + 2 }}", {}) == "4"
    finally:
        worker.close()
