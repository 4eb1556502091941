//! The collector's in-place view of an encoded result (`proto/src/raw.rs` `ResultView`) against
//! prost's decoding of the same bytes as `pb::ProbeResult`: the same verdict and the same result,
//! and the body it keeps is exactly the encoding of the fields it read (fields 8 to 13), never
//! longer than the input. Input: an encoded `ProbeResult`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxscope_proto::pb;
use mxscope_proto::raw::ResultView;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let view = ResultView::parse(data);
    let decoded = pb::ProbeResult::decode(data);
    assert_eq!(view.is_ok(), decoded.is_ok(), "{view:?} vs {decoded:?}");
    let (Ok(view), Ok(decoded)) = (view, decoded) else {
        return;
    };
    // Compared encoded: a NaN float fact is not equal to itself.
    assert_eq!(view.to_result().encode_to_vec(), decoded.encode_to_vec());
    let mut body = Vec::new();
    view.body(&mut body);
    assert_eq!(body.len(), view.body_len());
    assert!(body.len() <= data.len());
    let again = ResultView::parse(&body).expect("the kept body reads");
    let fields_8_to_13 = pb::ProbeResult {
        error_class: decoded.error_class,
        phase: decoded.phase,
        timings: decoded.timings,
        facts: decoded.facts,
        message: decoded.message,
        interval_ms: decoded.interval_ms,
        ..Default::default()
    };
    let expected = fields_8_to_13.encode_to_vec();
    assert_eq!(body, expected);
    assert_eq!(again.to_result().encode_to_vec(), expected);
});
