-- One rate-limit decision, atomic on the server, on the server's clock.
--
-- KEYS[1]  the state of one key under one algorithm
-- ARGV     algorithm, limit, period (µs), burst, cost
-- returns  {allowed (0|1), remaining, reset (µs), retry_after (µs, -1 = never)}
--
-- Times are microseconds since the epoch from TIME, so replicas whose clocks
-- drift still share one timeline. The arithmetic follows the local store's
-- (tidegate-resilience, ratelimit/algorithm.rs) so a limit means the same
-- wherever it is counted. Every key expires once its state is as good as
-- fresh, so idle clients cost no memory.

local key = KEYS[1]
local algorithm = ARGV[1]
local limit = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local floor, ceil, min, max = math.floor, math.ceil, math.min, math.max

-- Keeps the key until `us` from now (at least a millisecond).
local function expire_in(us)
  redis.call('PEXPIRE', key, max(ceil(us / 1000), 1))
end

local function answer(allowed, remaining, reset, retry)
  return {allowed and 1 or 0, max(floor(remaining), 0), ceil(reset), retry and ceil(retry) or -1}
end

if algorithm == 'fixed_window' then
  local window = floor(now / period)
  local seen = redis.call('HMGET', key, 'w', 'c')
  local count = 0
  if tonumber(seen[1]) == window then count = tonumber(seen[2]) end
  local to_end = (window + 1) * period - now
  local allowed = count + cost <= limit
  if allowed then
    count = count + cost
    redis.call('HSET', key, 'w', window, 'c', count)
    expire_in(to_end)
  end
  local reset = 0
  if count > 0 then reset = to_end end
  local retry = nil
  if not allowed and cost <= limit then retry = to_end end
  return answer(allowed, limit - count, reset, retry)

elseif algorithm == 'sliding_window' then
  local window = floor(now / period)
  local seen = redis.call('HMGET', key, 'w', 'p', 'c')
  local at = tonumber(seen[1])
  local previous, current = 0, 0
  if at == window then
    previous, current = tonumber(seen[2]), tonumber(seen[3])
  elseif at == window - 1 then
    previous = tonumber(seen[3])
  end
  local to_end = (window + 1) * period - now
  -- The previous window counts by the share of it still inside the period.
  local weight = to_end / period
  local allowed = previous * weight + current + cost <= limit
  if allowed then
    current = current + cost
    redis.call('HSET', key, 'w', window, 'p', previous, 'c', current)
    expire_in(to_end + period)
  end
  local remaining = limit - (previous * weight + current)
  local reset = 0
  if current > 0 then reset = to_end + period elseif previous > 0 then reset = to_end end
  local retry = nil
  if not allowed and cost <= limit then
    if current + cost <= limit then
      -- Wait for the previous window's weight to shrink enough.
      local room = limit - current - cost
      retry = to_end - min(room * period / max(previous, 1), to_end)
    else
      -- Wait into the next window, where this one becomes the previous.
      retry = to_end + period - min((limit - cost) * period / max(current, 1), period)
    end
  end
  return answer(allowed, remaining, reset, retry)

elseif algorithm == 'sliding_log' then
  while true do
    local oldest = redis.call('LINDEX', key, 0)
    if oldest and tonumber(oldest) + period <= now then
      redis.call('LPOP', key)
    else
      break
    end
  end
  local held = redis.call('LLEN', key)
  local allowed = held + cost <= limit
  if allowed then
    for _ = 1, cost do redis.call('RPUSH', key, now) end
    held = held + cost
    expire_in(period)
  end
  local reset = 0
  local newest = redis.call('LINDEX', key, -1)
  if newest then reset = tonumber(newest) + period - now end
  local retry = nil
  if not allowed and cost <= limit then
    retry = tonumber(redis.call('LINDEX', key, held + cost - limit - 1)) + period - now
  end
  return answer(allowed, limit - held, reset, retry)

elseif algorithm == 'token_bucket' then
  local seen = redis.call('HMGET', key, 't', 'at')
  local tokens, last = tonumber(seen[1]) or burst, tonumber(seen[2]) or now
  tokens = min(tokens + max(now - last, 0) * limit / period, burst)
  last = max(now, last)
  local allowed = tokens >= cost
  if allowed then tokens = tokens - cost end
  local until_full = (burst - tokens) * period / limit
  if until_full > 0 then
    redis.call('HSET', key, 't', tokens, 'at', last)
    expire_in(until_full)
  else
    redis.call('DEL', key)
  end
  local retry = nil
  if not allowed and cost <= burst then retry = (cost - tokens) * period / limit end
  return answer(allowed, tokens, until_full, retry)

elseif algorithm == 'gcra' then
  local interval = max(floor(period / limit), 1)
  local window = burst * interval
  local seen = redis.call('HMGET', key, 'tat', 'i')
  local tat, used = tonumber(seen[1]) or 0, tonumber(seen[2]) or interval
  if used ~= interval and tat > now then
    -- The quota changed: keep the count of requests, not their time.
    tat = now + floor((tat - now) * interval / used)
  end
  local price = cost * interval
  local base = max(tat, now)
  local next_tat = base + price
  local allowed = next_tat - now <= window
  local ahead = base - now
  if allowed then
    ahead = next_tat - now
    redis.call('HSET', key, 'tat', next_tat, 'i', interval)
    expire_in(ahead)
  end
  local retry = nil
  if not allowed and price <= window then retry = next_tat - now - window end
  return answer(allowed, (window - min(ahead, window)) / interval, ahead, retry)
end

return redis.error_reply('unknown rate-limit algorithm ' .. tostring(algorithm))
