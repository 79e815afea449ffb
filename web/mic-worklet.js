// The microphone's way to the WebSocket API on the audio thread: an AudioWorklet processor
// (loaded by websocket.js) that gathers the 128-frame blocks it is given into ~20 ms, resamples them
// from the context's rate to the API's 16 kHz (web/resample.js) and posts them to the page as
// 16-bit PCM, which the page only sends. The ScriptProcessorNode it replaces is deprecated and
// runs on the page's main thread; websocket.js keeps it only for contexts without an audioWorklet.
import { Resampler, toPcm16 } from "./resample.js";

class MicrophoneTo16k extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.resampler = new Resampler(sampleRate, options.processorOptions.rate);
    this.block = new Float32Array(Math.round(sampleRate * 0.02));  // one WebSocket message's worth
    this.filled = 0;
    this.stopped = false;
    this.port.onmessage = (e) => { if (e.data === "stop") this.stopped = true; };
  }

  process(inputs) {
    if (this.stopped) return false;  // the page let the microphone go: the processor may go too
    const channel = inputs[0][0];  // absent while nothing is connected: nothing to send
    if (!channel) return true;
    for (let done = 0; done < channel.length;) {
      const n = Math.min(channel.length - done, this.block.length - this.filled);
      this.block.set(channel.subarray(done, done + n), this.filled);
      this.filled += n;
      done += n;
      if (this.filled === this.block.length) {
        const pcm = toPcm16(this.resampler.push(this.block));
        this.port.postMessage(pcm, [pcm.buffer]);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("microphone-to-16k", MicrophoneTo16k);
