-- Hold a predictor's answer for a few milliseconds before forwarding it: coglet returns its prediction slot
-- shortly after it answers, and with maxconn 1 the next queued request would otherwise reach it first (409).
-- While the answer is held, HAProxy still counts the request against the backend, so nothing else is sent there.
local grace_ms = tonumber(os.getenv("COG_SLOT_GRACE_MS") or "25")

core.register_action("cog_slot_grace", { "http-res" }, function(txn)
    core.msleep(grace_ms)
end)
