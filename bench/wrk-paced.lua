-- Paces wrk at a fixed offered rate (wrk2 is not packaged in Debian 12).
--   WRK_RATE=40000 WRK_THREADS=2 wrk -t 2 -c 64 -d 5s -s wrk-paced.lua URL
-- Each wrk thread hands out send slots WRK_THREADS/WRK_RATE seconds apart; a connection that
-- finished its previous response waits (wrk's delay() hook) until the next free slot. So the
-- offered rate is fixed as long as enough connections are idle, and wrk's latency (send ->
-- response) excludes the wait. Caveat: still a closed loop per connection, so a long stall
-- delays only that connection's next request (no coordinated-omission correction like wrk2).
-- Prints one JSON line at the end with p50/p99/p99.9 in ms. Bounded in count: each thread
-- stops after WRK_MAX_REQ requests.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } paced_timespec;
int clock_gettime(int clk_id, paced_timespec *tp);
]]
local ts = ffi.new("paced_timespec")
local function now_ms()
   ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
   return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local rate = tonumber(os.getenv("WRK_RATE") or "1000")
local nthreads = tonumber(os.getenv("WRK_THREADS") or "2")
local max_req = tonumber(os.getenv("WRK_MAX_REQ") or "2000000")
local interval = 1000 * nthreads / rate
local next_slot = nil
local n = 0
local req

function init(args)
   req = wrk.format()
end

function delay()
   local t = now_ms()
   if next_slot == nil or next_slot < t - 5 then
      next_slot = t -- fell behind by more than 5 ms: do not burst to catch up
   end
   local d = next_slot - t
   next_slot = next_slot + interval
   if d < 0 then d = 0 end
   return d
end

function request()
   n = n + 1
   if n > max_req then
      wrk.thread:stop()
   end
   return req
end

function done(summary, latency, requests)
   io.write(string.format(
      '{"paced_rate":%d,"requests":%d,"duration_s":%.3f,"errors":%d,"p50_ms":%.3f,'
         .. '"p99_ms":%.3f,"p999_ms":%.3f,"max_ms":%.3f}\n',
      rate, summary.requests, summary.duration / 1e6,
      summary.errors.connect + summary.errors.read + summary.errors.write
         + summary.errors.status + summary.errors.timeout,
      latency:percentile(50) / 1000, latency:percentile(99) / 1000,
      latency:percentile(99.9) / 1000, latency.max / 1000))
end
