// Streaming resampler for the microphone over the WebSocket API, which takes 16 kHz PCM (in
// web/mic-worklet.js on the audio thread, or in websocket.js's ScriptProcessorNode where there is none).
// The page's AudioContext runs at the device's rate: Firefox refuses to connect a microphone to
// a context made at another rate ("Connecting AudioNodes from AudioContexts with different
// sample-rate is currently not supported"), so the page converts here instead of asking the
// browser for a 16 kHz context. A windowed-sinc low-pass (Hann window, `zeros` zero crossings
// each side, cut at 90% of the lower Nyquist frequency) evaluated at each output instant:
// any ratio (48 or 44.1 kHz down to 16), no aliasing of what lies above 8 kHz.
export class Resampler {
  constructor(from, to, zeros = 8) {
    this.step = from / to;  // input samples per output sample
    this.cutoff = 0.9 * Math.min(1, to / from);  // of the input's Nyquist frequency
    this.half = Math.ceil(zeros / this.cutoff);  // kernel half-width, input samples
    this.buf = new Float32Array(this.half);  // zeros before the first sample: no output is skipped
    this.pos = this.half;  // the next output's instant, in input samples from buf[0]
  }

  kernel(d) {  // the low-pass's impulse response at distance d (input samples)
    if (Math.abs(d) >= this.half) return 0;
    const x = Math.PI * this.cutoff * d;
    const sinc = x === 0 ? 1 : Math.sin(x) / x;
    return sinc * 0.5 * (1 + Math.cos(Math.PI * d / this.half));
  }

  // the output for one block of input (any length); what it cannot finish yet waits for the next
  push(input) {
    const buf = new Float32Array(this.buf.length + input.length);
    buf.set(this.buf);
    buf.set(input, this.buf.length);
    const out = [];
    let pos = this.pos;
    while (pos + this.half < buf.length) {
      const first = Math.ceil(pos - this.half), last = Math.floor(pos + this.half);
      let sum = 0, weights = 0;
      for (let i = Math.max(0, first); i <= last; i++) {
        const w = this.kernel(pos - i);
        sum += w * buf[i];
        weights += w;
      }
      out.push(weights ? sum / weights : 0);  // (normalised: exact at DC)
      pos += this.step;
    }
    const keep = Math.max(0, Math.floor(pos - this.half));  // what the next outputs still read
    this.buf = buf.slice(keep);
    this.pos = pos - keep;
    return Float32Array.from(out);
  }
}

// Samples of -1..1 as the API's 16-bit PCM (clipped: a loud microphone must not wrap around)
export function toPcm16(x) {
  const pcm = new Int16Array(x.length);
  for (let i = 0; i < x.length; i++) pcm[i] = Math.max(-1, Math.min(1, x[i])) * 32767;
  return pcm;
}
