"""Audio task families: short tones and chirps in noise and a low hum.

A clip is ``AUDIO_SECONDS`` of mono float32 at ``SAMPLE_RATE`` (3 s at 16 kHz). Every clip carries white
noise and a 100-180 Hz hum (clutter below the 300 Hz floor of every event); events are tones (constant
frequency) or chirps (linear sweeps), 300-2000 Hz, with 10 ms raised-cosine fades. Times are whole
milliseconds and frequencies whole hertz, so the scene is exact and JSON-able.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmtok.testbed.data.items import Draft, Family, Retry, mc_choices, vocab_of

SAMPLE_RATE = 16_000
AUDIO_SECONDS = 3.0
FADE_MS = 10
BEEP_COUNTS = ("1", "2", "3", "4", "5", "6")
ORDINALS = ("first", "second")


def render_audio(scene: dict[str, Any]) -> np.ndarray:
    """Synthesize the waveform ``[samples]`` (float32 in [-1, 1]) of a scene."""
    sr = scene["sample_rate"]
    n = int(round(scene["duration_ms"] * sr / 1000))
    rng = np.random.default_rng(scene["noise"]["seed"])
    t = np.arange(n, dtype=np.float64) / sr
    wave = rng.normal(0.0, scene["noise"]["level"], size=n)
    hum = scene["hum"]
    wave += hum["amplitude"] * np.sin(2 * np.pi * hum["freq"] * t + hum["phase"])
    fade = int(FADE_MS * sr / 1000)
    for ev in scene["events"]:
        a = int(ev["start_ms"] * sr / 1000)
        m = int(ev["dur_ms"] * sr / 1000)
        tau = np.arange(m, dtype=np.float64) / sr
        dur = m / sr
        phase = 2 * np.pi * (ev["f0"] * tau + (ev["f1"] - ev["f0"]) * tau**2 / (2 * dur))
        env = np.ones(m)
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
        env[:fade] = ramp
        env[m - fade:] = ramp[::-1]
        wave[a:a + m] += ev["amplitude"] * env * np.sin(phase)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def _tone(start_ms: int, dur_ms: int, f0: int, amplitude: float, f1: int | None = None) -> dict[str, Any]:
    return {"kind": "tone" if f1 is None or f1 == f0 else "chirp", "start_ms": int(start_ms),
            "dur_ms": int(dur_ms), "f0": int(f0), "f1": int(f0 if f1 is None else f1),
            "amplitude": round(float(amplitude), 3)}


def _scene(rng: np.random.Generator, events: list[dict[str, Any]], query: dict[str, Any]) -> dict[str, Any]:
    duration_ms = int(AUDIO_SECONDS * 1000)
    if events and events[-1]["start_ms"] + events[-1]["dur_ms"] > duration_ms - 50:
        raise Retry
    query["key"] = [[e["start_ms"], e["start_ms"] + e["dur_ms"]] for e in events]
    return {"sample_rate": SAMPLE_RATE, "duration_ms": duration_ms,
            "noise": {"seed": int(rng.integers(2**31)), "level": round(float(rng.uniform(0.01, 0.04)), 3)},
            "hum": {"freq": int(rng.integers(100, 181)), "amplitude": round(float(rng.uniform(0.03, 0.08)), 3),
                    "phase": round(float(rng.uniform(0, 2 * np.pi)), 3)},
            "events": events, "query": query}


def _sequence(rng: np.random.Generator, durations: list[int], gap: tuple[int, int]) -> list[int]:
    """Start times (ms) for events of ``durations`` with gaps drawn from ``gap``, at a random offset."""
    gaps = [int(rng.integers(gap[0], gap[1] + 1)) for _ in durations[1:]]
    total = sum(durations) + sum(gaps)
    latest = int(AUDIO_SECONDS * 1000) - 100 - total
    if latest < 100:
        raise Retry
    t = int(rng.integers(100, latest + 1))
    starts = []
    for i, d in enumerate(durations):
        starts.append(t)
        t += d + (gaps[i] if i < len(gaps) else 0)
    return starts


def _freq(rng: np.random.Generator, lo: int = 300, hi: int = 2000) -> int:
    return int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))


def _beep_count(rng: np.random.Generator) -> Draft:
    k = int(rng.integers(1, 7))
    f, amp = _freq(rng, 400, 1600), rng.uniform(0.1, 0.4)
    durations = [int(rng.integers(80, 151)) for _ in range(k)]
    starts = _sequence(rng, durations, (100, 300))
    events = [_tone(s, d, f, amp) for s, d in zip(starts, durations, strict=True)]
    answer = str(k)
    return Draft(_scene(rng, events, {}), "how many beeps are there ?", answer,
                 mc_choices(rng, answer, BEEP_COUNTS))


def _pair(rng: np.random.Generator, attribute: str) -> Draft:
    """Two tones that differ clearly in ``attribute`` (``"higher"``, ``"longer"`` or ``"louder"``)."""
    durations = [int(rng.integers(200, 401)) for _ in range(2)]
    freqs = [_freq(rng), _freq(rng)]
    amps = [rng.uniform(0.1, 0.4) for _ in range(2)]
    winner = int(rng.integers(2))
    loser = 1 - winner
    if attribute == "higher":
        freqs[loser] = _freq(rng, 300, 1000)
        freqs[winner] = int(round(freqs[loser] * rng.uniform(1.3, 2.0)))
    elif attribute == "longer":
        durations[loser] = int(rng.integers(120, 251))
        durations[winner] = int(round(durations[loser] * rng.uniform(1.8, 3.0)))
    else:
        amps[loser] = rng.uniform(0.08, 0.15)
        amps[winner] = amps[loser] * rng.uniform(2.5, 4.0)
    starts = _sequence(rng, durations, (200, 600))
    events = [_tone(starts[i], durations[i], freqs[i], amps[i]) for i in range(2)]
    answer = ORDINALS[winner]
    return Draft(_scene(rng, events, {}), f"which tone was {attribute} , the first or the second ?", answer,
                 mc_choices(rng, answer, ORDINALS))


def _chirp(rng: np.random.Generator) -> Draft:
    k = int(rng.integers(2, 4))
    present = bool(rng.integers(2))
    durations = [int(rng.integers(150, 351)) for _ in range(k)]
    starts = _sequence(rng, durations, (150, 400))
    events = [_tone(s, d, _freq(rng), rng.uniform(0.1, 0.4)) for s, d in zip(starts, durations, strict=True)]
    if present:
        i = int(rng.integers(k))
        lo = _freq(rng, 300, 900)
        hi = int(round(lo * rng.uniform(1.8, 2.2)))
        f0, f1 = (lo, hi) if rng.integers(2) else (hi, lo)
        events[i] = _tone(starts[i], durations[i], f0, events[i]["amplitude"], f1)
    answer = "yes" if present else "no"
    return Draft(_scene(rng, events, {}), "was there a chirp ?", answer, mc_choices(rng, answer, ("yes", "no")))


def _family(name: str, fn: Any, description: str, chance: float, n_choices: int, template: str,
            answers: tuple[str, ...]) -> Family:
    return Family(name, "audio", description, fn, render_audio, chance, n_choices, vocab_of((template,), answers))


FAMILIES: tuple[Family, ...] = (
    _family("beep_count", _beep_count, "how many beeps (1-6, 80-150 ms each)", 1 / len(BEEP_COUNTS), 4,
            "how many beeps are there ?", BEEP_COUNTS),
    _family("higher", lambda rng: _pair(rng, "higher"), "which of two tones was higher", 0.5, 2,
            "which tone was higher , the first or the second ?", ORDINALS),
    _family("longer", lambda rng: _pair(rng, "longer"), "which of two tones was longer", 0.5, 2,
            "which tone was longer , the first or the second ?", ORDINALS),
    _family("louder", lambda rng: _pair(rng, "louder"), "which of two tones was louder", 0.5, 2,
            "which tone was louder , the first or the second ?", ORDINALS),
    _family("chirp", _chirp, "was one of 2-3 events a frequency sweep (yes / no)", 0.5, 2,
            "was there a chirp ?", ("yes", "no")),
)
