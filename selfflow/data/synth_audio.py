"""Synthesised notes, chords, rhythms and melodies for the built-in audio data.

A clip is a list of note events (pitch, onset, duration) played with one timbre, rendered by
additive synthesis: every timbre is a set of harmonics whose fundamental is the loudest, so the
FFT peak of a single note is its pitch. Partials at or above 0.45 x the sample rate are dropped
(no aliasing), and every clip is peak-normalised to -6 dBFS and quantised to 16 bit.

    clip = sample_audio_clip(np.random.default_rng(0), seconds=1.0)
    audio_caption(clip)    # e.g. 'a fast plucked melody of E4 C5 A4 at 180 bpm'
    wave = render_audio(clip, sample_rate=16000, channels=1)   # (16000, 1) int16

Tempo: melody and rhythm notes fall on the beats (every 60 / bpm seconds, from t = 0); melody
notes sound for 85% of a beat, rhythm notes for 40%, so the energy envelope dips between them.
"""

import io
from dataclasses import dataclass

import numpy as np

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)  # semitones above the tonic
CHORDS = {"major": (0, 4, 7), "minor": (0, 3, 7)}
TEMPOS = {"slow": (90, 100, 120), "fast": (180, 210, 240)}  # bpm
TIMBRE_WORDS = {"sine": "sine", "square": "square-wave", "organ": "organ", "plucked": "plucked"}
TEMPLATES = ("note", "chord", "melody", "rhythm")
ATTACK_S, RELEASE_S = 0.005, 0.01
MAX_NOTES = 8
PEAK = 0.5  # -6 dBFS


@dataclass
class Note:
    name: str  # scientific pitch notation, e.g. "A4"
    midi: int
    hz: float
    onset: float  # seconds
    duration: float  # seconds the note sounds (before a RELEASE_S fade)


@dataclass
class AudioClip:
    template: str  # one of TEMPLATES
    timbre: str  # a key of TIMBRE_WORDS
    notes: list[Note]
    tempo_bpm: int | None  # melody and rhythm only
    pace: str | None  # "slow" or "fast" (from TEMPOS), melody and rhythm only
    chord: str | None  # e.g. "C major", chord only
    seconds: float


def midi_name(midi: int) -> str:
    return f"{NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


def midi_hz(midi: int) -> float:
    """Equal temperament, A4 (MIDI 69) = 440 Hz."""
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def make_note(midi: int, onset: float, duration: float) -> Note:
    return Note(midi_name(midi), midi, round(midi_hz(midi), 3), round(onset, 6), round(duration, 6))


# ---------------------------------------------------------------- captions


def audio_caption(clip: AudioClip) -> str:
    timbre = TIMBRE_WORDS[clip.timbre]
    names = " ".join(n.name for n in clip.notes)
    if clip.template == "note":
        text = f"single {timbre} {names} note ({clip.notes[0].hz:.0f} Hz)"
    elif clip.template == "chord":
        text = f"{timbre} {clip.chord} chord ({names})"
    elif clip.template == "melody":
        text = f"{clip.pace} {timbre} melody of {names} at {clip.tempo_bpm} bpm"
    else:
        adverb = "slowly" if clip.pace == "slow" else "quickly"
        text = f"{timbre} {clip.notes[0].name} note repeated {adverb} at {clip.tempo_bpm} bpm"
    return ("an " if text[0] in "aeiou" else "a ") + text


# ---------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def beat_onsets(bpm: int, seconds: float) -> list[float]:
    """Onsets on the beat, keeping those with at least half a beat left in the clip (at least one)."""
    beat = 60.0 / bpm
    n = int(np.floor((seconds - 0.5 * beat) / beat)) + 1
    return [k * beat for k in range(max(1, min(n, MAX_NOTES)))]


def sample_audio_clip(rng: np.random.Generator, seconds: float) -> AudioClip:
    template, timbre = _pick(rng, TEMPLATES), _pick(rng, TIMBRE_WORDS)
    if template == "note":
        note = make_note(int(rng.integers(48, 85)), 0.0, seconds - RELEASE_S)  # C3 .. C6, fading out at the end
        return AudioClip(template, timbre, [note], None, None, None, seconds)
    if template == "chord":
        root, quality = int(rng.integers(48, 68)), _pick(rng, CHORDS)
        notes = [make_note(root + step, 0.0, seconds - RELEASE_S) for step in CHORDS[quality]]
        return AudioClip(template, timbre, notes, None, None, f"{NOTE_NAMES[root % 12]} {quality}", seconds)
    pace = _pick(rng, TEMPOS)
    bpm = int(_pick(rng, TEMPOS[pace]))
    beat = 60.0 / bpm
    onsets = beat_onsets(bpm, seconds)
    if template == "melody":  # C major scale from C4 to C6, no note repeated twice in a row
        scale = [60 + 12 * octave + step for octave in range(2) for step in MAJOR_SCALE] + [84]
        midis = [int(rng.choice(scale))]
        while len(midis) < len(onsets):
            midis.append(int(rng.choice([m for m in scale if m != midis[-1]])))
        gate = 0.85
    else:  # rhythm: one pitch, staccato
        midis = [int(rng.integers(45, 73))] * len(onsets)  # A2 .. C5
        gate = 0.4
    notes = [make_note(m, t, min(gate * beat, seconds - t - RELEASE_S)) for m, t in zip(midis, onsets, strict=True)]
    return AudioClip(template, timbre, notes, bpm, pace, None, seconds)


# ---------------------------------------------------------------- samples


def partials(timbre: str, hz: float, sample_rate: int) -> list[tuple[int, float, float]]:
    """(harmonic number, amplitude, decay time in seconds or inf) of a timbre, below 0.45 x sample rate."""
    if timbre == "sine":
        table = [(1, 1.0, np.inf)]
    elif timbre == "square":  # odd harmonics at 1/k, the Fourier series of a square wave
        table = [(k, 1.0 / k, np.inf) for k in range(1, 16, 2)]
    elif timbre == "organ":  # a few drawbar-like harmonics
        table = [(1, 1.0, np.inf), (2, 0.6, np.inf), (3, 0.4, np.inf), (4, 0.3, np.inf), (6, 0.15, np.inf)]
    elif timbre == "plucked":  # a string: bright attack, upper harmonics die first
        table = [(k, 1.0 / k, 0.4 / k) for k in range(1, 9)]
    else:
        raise ValueError(f"unknown timbre {timbre!r}")
    return [p for p in table if p[0] * hz < 0.45 * sample_rate]


def render_note(note: Note, timbre: str, sample_rate: int) -> np.ndarray:
    """float64 samples of one note, from its onset to the end of its release."""
    n = int(round((note.duration + RELEASE_S) * sample_rate))
    t = np.arange(n) / sample_rate
    wave = np.zeros(n)
    for k, amp, decay in partials(timbre, note.hz, sample_rate):
        wave += amp * np.exp(-t / decay) * np.sin(2 * np.pi * k * note.hz * t)
    # linear attack, then a linear release that ends RELEASE_S after the note's duration
    env = np.minimum(1.0, t / ATTACK_S) * np.clip((note.duration + RELEASE_S - t) / RELEASE_S, 0.0, 1.0)
    return wave * env


def render_audio(clip: AudioClip, sample_rate: int, channels: int) -> np.ndarray:
    """(samples, channels) int16; every channel carries the same signal."""
    total = int(round(clip.seconds * sample_rate))
    mix = np.zeros(total)
    for note in clip.notes:
        start = int(round(note.onset * sample_rate))
        wave = render_note(note, clip.timbre, sample_rate)[: total - start]
        mix[start : start + len(wave)] += wave
    mix *= PEAK / max(np.abs(mix).max(), 1e-9)
    pcm = np.rint(mix * 32767).astype(np.int16)
    return np.repeat(pcm[:, None], channels, axis=1)


def encode_audio(pcm: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """16-bit FLAC or WAV bytes of (samples, channels) int16."""
    import soundfile  # imported here: only writing audio needs it (and its native library)

    buf = io.BytesIO()
    soundfile.write(buf, pcm, sample_rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()
