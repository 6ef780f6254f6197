"""The WebRTC gateway (`streamdiff.server`): aiohttp app (app), sessions (sessions), media
tracks and aiortc settings (webrtc), Prometheus exposition (prom). Only this package and
`streamdiff.client` import aiortc, aiohttp and websockets."""
