import pytest

from trainer.schedule import learning_rate


def test_schedule_warmup_then_cosine():
    kw = dict(peak_lr=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert learning_rate(0, **kw) == pytest.approx(1e-4)       # the first update is not wasted at lr 0
    assert learning_rate(9, **kw) == pytest.approx(1e-3)
    assert learning_rate(10, **kw) == pytest.approx(1e-3)
    assert learning_rate(60, **kw) == pytest.approx(0.55e-3)   # half-way down the cosine
    assert learning_rate(110, **kw) == pytest.approx(1e-4)
    assert learning_rate(500, **kw) == pytest.approx(1e-4)
    lrs = [learning_rate(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate(50, **dict(kw, schedule="linear")) == pytest.approx(1e-3 - 0.9e-3 * 0.4)
