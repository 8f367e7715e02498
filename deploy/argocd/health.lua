-- Argo CD health check for shipyard.dev/ModelDeployment.
-- Install it as the key "resource.customizations.health.shipyard.dev_ModelDeployment" of the argocd-cm ConfigMap
-- (docs/packaging.md). Argo CD runs it with the live object in `obj` and reads the returned table.
--
--   status missing, or observedGeneration behind metadata.generation  -> Progressing (not reconciled yet)
--   condition Stalled=True                                            -> Degraded (needs a person or a new spec)
--   phase Paused                                                      -> Suspended (manual step, inconclusive or
--                                                                        failed analysis under the Manual policy)
--   phase RolledBack, Failed, Degraded                                -> Degraded
--   phase Healthy with condition Ready=True                           -> Healthy
--   anything else (Pending, Compressing, Progressing, Healthy not yet Ready) -> Progressing
local hs = {}

local function condition(status, kind)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(status, fallback)
  if status.message ~= nil and status.message ~= "" then
    return status.message
  end
  return fallback
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Shipyard operator to reconcile"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase or "Pending"
local stalled = condition(status, "Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(status, "Stalled: " .. tostring(stalled.reason))
  return hs
end

if phase == "Paused" then
  hs.status = "Suspended"
  local reason = status.pausedReason or "paused"
  hs.message = reason .. ": " .. describe(status, "waiting for shipyard.dev/promote or shipyard.dev/abort")
  return hs
end

if phase == "RolledBack" or phase == "Failed" or phase == "Degraded" then
  hs.status = "Degraded"
  hs.message = describe(status, phase)
  return hs
end

local ready = condition(status, "Ready")
if phase == "Healthy" and ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(status, "Version " .. tostring(status.stableVersion) .. " is serving")
  return hs
end

hs.status = "Progressing"
hs.message = describe(status, phase)
return hs
