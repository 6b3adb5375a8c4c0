-- wrk script for bench_webhooks.py: signed webhook requests, each sent once.
--
--   wrk -tT -cC -dDs -s wrk_webhooks.lua URL -- hooks REQUESTS PATH T
--
-- wrk's LuaJIT has no HMAC, so bench_webhooks.py signs the requests beforehand: REQUESTS
-- holds one "<X-Stavily-Signature value>\t<JSON body>" per line, every body unique (the
-- server answers the same signed request again 200 `duplicate`, not 202). Thread i of T
-- takes the lines i+1, i+1+T, ..., builds its requests to PATH in init() and sends each
-- once, in order. Should a thread run out it starts over; those requests are repeats,
-- counted as "repeats" (the server answers them 200, counted apart from the 202s).
--
-- At the end one line "WRK_JSON {...}" carries the figures for the Python driver: the
-- keys of wrk_agents.lua, plus the answers by status (202, 200, every other status seen
-- with its count) and the requests written, so that those still in flight when wrk
-- stopped (stored by the server, never counted by wrk) are known.

local threads = {}
local next_thread = 0

function setup(thread)
   thread:set("thread_index", next_thread)
   next_thread = next_thread + 1
   table.insert(threads, thread)
end

local requests = {}
local position = 0
-- Globals, not locals: done() reads them from each thread with thread:get().
sent = 0
repeats = 0
prepared = 0
responses = 0
status202 = 0
status200 = 0
others = 0
other_statuses = ""  -- "status:count,..." of every other status, built in response()
local other_counts = {}

function init(args)
   local file, path = args[2], args[3]
   local thread_count = tonumber(args[4] or "1")
   local index = 0
   for line in io.lines(file) do
      local signature, body = line:match("^([^\t]+)\t(.+)$")
      if signature then
         if index % thread_count == (thread_index or 0) then
            table.insert(requests, wrk.format("POST", path, {
               ["Content-Type"] = "application/json",
               ["User-Agent"] = "Stavily-Bench-Webhooks/1.0",
               ["X-Stavily-Signature"] = signature,
            }, body))
         end
         index = index + 1
      end
   end
   prepared = #requests
end

function request()
   sent = sent + 1
   position = position + 1
   if position > #requests then
      position = 1
   end
   if sent > #requests then
      repeats = repeats + 1
   end
   return requests[position]
end

function response(status, headers, body)
   responses = responses + 1
   if status == 202 then
      status202 = status202 + 1
   elseif status == 200 then
      status200 = status200 + 1
   else
      others = others + 1
      other_counts[status] = (other_counts[status] or 0) + 1
      local parts = {}
      for code, count in pairs(other_counts) do
         table.insert(parts, code .. ":" .. count)
      end
      other_statuses = table.concat(parts, ",")
   end
end

function done(summary, latency, requests)
   local totals = {
      sent = 0, repeats = 0, prepared = 0, responses = 0, status202 = 0, status200 = 0,
      others = 0,
   }
   local other = {}
   for _, thread in ipairs(threads) do
      for key, _ in pairs(totals) do
         totals[key] = totals[key] + (thread:get(key) or 0)
      end
      for code, count in string.gmatch(thread:get("other_statuses") or "", "(%d+):(%d+)") do
         other[code] = (other[code] or 0) + tonumber(count)
      end
   end
   local parts = {}
   for code, count in pairs(other) do
      table.insert(parts, string.format('"%s": %d', code, count))
   end
   local errors = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "responses": %d, "duration_us": %d, "sent": %d, ' ..
      '"repeats": %d, "prepared": %d, "status202": %d, "status200": %d, "others": %d, ' ..
      '"other_statuses": {%s}, "connect_errors": %d, "read_errors": %d, ' ..
      '"write_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
      '"max_us": %d, "mean_us": %.1f}\n',
      summary.requests, totals.responses, summary.duration, totals.sent, totals.repeats,
      totals.prepared, totals.status202, totals.status200, totals.others,
      table.concat(parts, ", "), errors.connect, errors.read, errors.write, errors.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
