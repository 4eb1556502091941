//! The Ingest stream's messages as the collector decodes them: prost `pb::AgentMessage` and
//! `pb::raw::AgentMessage` (results kept as bytes), each raw result then read by `ResultView`.
//! Input: one encoded `AgentMessage`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxscope_proto::pb;
use mxscope_proto::raw::ResultView;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let typed = pb::AgentMessage::decode(data);
    let raw = pb::raw::AgentMessage::decode(data);
    if let Ok(typed) = &typed {
        let raw = raw.as_ref().expect("what decodes typed decodes raw");
        if let (
            Some(pb::agent_message::Msg::Batch(batch)),
            Some(pb::raw::agent_message::Msg::Batch(raw_batch)),
        ) = (&typed.msg, &raw.msg)
        {
            assert_eq!(batch.results.len(), raw_batch.results.len());
        }
        let again = pb::AgentMessage::decode(typed.encode_to_vec().as_slice());
        assert!(again.is_ok());
    }
    if let Ok(pb::raw::AgentMessage {
        msg: Some(pb::raw::agent_message::Msg::Batch(batch)),
    }) = &raw
    {
        for result in &batch.results {
            let view = ResultView::parse(result);
            if typed.is_ok() {
                assert!(view.is_ok(), "{view:?}");
            }
        }
    }
});
