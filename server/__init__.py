"""streamgen's server: FastAPI app, sessions, one inference worker, WebRTC (WHEP) and WebSocket transports."""
