-- Route each newly stable study's radiographs (CR/DX) to the AI worker, once per series.
routed = {}
function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  for i, s in pairs(series) do
    local modality = s['MainDicomTags']['Modality']
    if (modality == 'CR' or modality == 'DX') and routed[s['ID']] == nil then
      routed[s['ID']] = true
      RestApiPost('/modalities/worker/store', s['ID'])
    end
  end
end
