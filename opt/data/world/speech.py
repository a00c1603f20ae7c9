"""Speak captions with eSpeak NG, driven through ctypes.

The library and its voice data come from the ``espeakng-loader`` wheel, so no
system package (and no root) is needed. Synthesis is synchronous: the
callback collects 16-bit samples at the engine's rate (22,050 Hz), which are
then resampled to 16 kHz and given a little background noise.

eSpeak NG keeps global state, so one :class:`Speaker` per process; it is not
thread-safe. Its output depends on a random generator, which is seeded from the
sample's own generator before every utterance, and on wave-generator state
that carries over from earlier utterances in the same process (no API resets
it). Output is therefore reproducible for the same sequence of utterances in
a fresh process: the world generator speaks each shard in a process of its own.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio.transforms as AT

# (voice name, variant); the variant changes timbre and pitch range. These speak train, val,
# test and test_novel.
VOICES = (
    "en-us",
    "en-us+f3",
    "en-gb-x-rp",
    "en-gb-x-rp+f2",
    "en-gb-scotland+m3",
    "en-029+f4",
)
# test_unseen's voices: accents and variants that none of VOICES uses, so the split measures
# speech from speakers a model never heard (a real corpus has thousands)
UNSEEN_VOICES = (
    "en+m1",
    "en+f1",
    "en-us-nyc+m5",
    "en-us-nyc+f5",
    "en-gb-x-gbclan+m7",
    "en-gb-x-gbcwmd+m2",
)
RATE_WPM = (130, 190)
PITCH = (30, 70)  # eSpeak pitch parameter, 0-100
SNR_DB = (20.0, 35.0)

# train's voices (generator 2.0): half of its utterances are spoken by VOICES, which test speaks,
# the other half by one of these accents with one of many timbre variants, none of them
# test_unseen's; train also widens the rate, pitch and noise ranges. A model then hears 174
# voices in training instead of six, while test_unseen's speakers stay unheard.
TRAIN_ACCENTS = ("en-us", "en-gb-x-rp", "en-gb-scotland", "en-029")
TRAIN_VARIANTS = (
    "m3", "m4", "m6", "m8", "f2", "f3", "f4", "Alex", "Andy", "Annie", "Denis", "Gene", "Jacky", "Lee",
    "Michael", "Mike", "adam", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "edward",
    "grandma", "grandpa", "iven", "john", "linda", "max", "norbert", "paul", "quincy", "rob", "robert",
    "shelby", "steph", "travis", "victor", "zac", "klatt", "croak",
)
TRAIN_WIDE_VOICES = tuple(f"{accent}+{variant}" for accent in TRAIN_ACCENTS for variant in TRAIN_VARIANTS)
TRAIN_RATE_WPM = (125, 220)
TRAIN_PITCH = (15, 85)
TRAIN_SNR_DB = (10.0, 35.0)
PEAK_LEVEL = 0.8  # clean speech is scaled to this peak before noise is added

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE, _ESPEAK_PITCH = 1, 3
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class Voice:
    name: str  # eSpeak voice, optionally with a +variant
    rate: int  # words per minute
    pitch: int  # 0-100
    snr_db: float  # background noise level

    @classmethod
    def sample(cls, rng: np.random.Generator, voices: tuple[str, ...] = VOICES, *,
               rate: tuple[int, int] = RATE_WPM, pitch: tuple[int, int] = PITCH,
               snr_db: tuple[float, float] = SNR_DB) -> "Voice":
        return cls(
            name=voices[rng.integers(len(voices))],
            rate=int(rng.integers(rate[0], rate[1] + 1)),
            pitch=int(rng.integers(pitch[0], pitch[1] + 1)),
            snr_db=float(np.round(rng.uniform(*snr_db), 2)),
        )

    @classmethod
    def sample_training(cls, rng: np.random.Generator) -> "Voice":
        """A train utterance's voice: VOICES or the wide pool (even odds), with the wide ranges."""
        voices = VOICES if rng.integers(2) == 0 else TRAIN_WIDE_VOICES
        return cls.sample(rng, voices, rate=TRAIN_RATE_WPM, pitch=TRAIN_PITCH, snr_db=TRAIN_SNR_DB)


class Speaker:
    """Turns text into a 16 kHz mono float waveform with a given :class:`Voice`."""

    def __init__(self, sample_rate: int = 16000) -> None:
        import espeakng_loader

        self.sample_rate = sample_rate
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self._lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                           ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        data_path = espeakng_loader.get_data_path().encode()
        self.engine_rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
        if self.engine_rate <= 0:
            raise RuntimeError("eSpeak NG failed to initialise")
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: the library calls it later
        self._lib.espeak_SetSynthCallback(self._callback)
        # the resampling kernel is built once (torchaudio.functional.resample builds it on every call)
        self._resample = AT.Resample(self.engine_rate, sample_rate, dtype=torch.float32)

    def _collect(self, samples, count, _events) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0

    def synthesize(self, text: str, voice: Voice, seed: int = 0) -> np.ndarray:
        """Clean speech at the engine rate, int16; ``seed`` seeds eSpeak's random generator."""
        self._lib.espeak_ng_SetRandSeed(seed)
        if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise ValueError(f"unknown eSpeak voice {voice.name!r}")
        self._lib.espeak_SetParameter(_ESPEAK_RATE, voice.rate, 0)
        self._lib.espeak_SetParameter(_ESPEAK_PITCH, voice.pitch, 0)
        self._chunks = []
        encoded = text.encode("utf-8") + b"\0"
        status = self._lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
        if status != 0:
            raise RuntimeError(f"eSpeak NG could not speak {text!r} (status {status})")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)

    def speak(self, text: str, voice: Voice, rng: np.random.Generator) -> np.ndarray:
        """Speech at ``sample_rate`` as float32 in [-1, 1], with noise at ``voice.snr_db``."""
        speech = self.synthesize(text, voice, seed=int(rng.integers(2**31)))
        clean = torch.from_numpy(speech.astype(np.float32) / 32768.0)
        wave = self._resample(clean).numpy()
        peak = float(np.abs(wave).max()) if wave.size else 0.0
        if peak > 0:
            wave = wave * (PEAK_LEVEL / peak)
        power = float(np.mean(wave**2)) if wave.size else 0.0
        noise_power = power / (10 ** (voice.snr_db / 10))
        wave = wave + rng.normal(0.0, np.sqrt(noise_power), size=wave.shape)
        return np.clip(wave, -1.0, 1.0).astype(np.float32)
