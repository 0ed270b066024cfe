mod support;
use support::{catch_all, gateway, raw};
use tidegate_testkit::{text, Upstream};

#[tokio::test]
async fn explore() {
    let upstream = Upstream::start(|req| async move {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
        text(200, &format!("got {body:?}"))
    })
    .await;
    let gw = gateway(&catch_all(&upstream.url(), "")).await;
    let cases: &[&str] = &[
        "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "POST /c HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "POST /c2 HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
        "POST /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "POST /f HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "GET /g HTTP/1.1\nHost: x\n\n",
        "GET /h HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
        "POST /i HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
        "POST /j HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n",
        "POST /k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
        "POST /l HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff3\r\nabc\r\n0\r\n\r\n",
        "POST /m HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n 3\r\nabc\r\n0\r\n\r\n",
        "POST /m2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n",
        "POST /m3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\n\r\n",
        "POST /m4 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabc\r\n0\r\n\r\n",
        "POST /n HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
        "POST /o HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc",
        "POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "POST /q HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        "POST /q2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
        "POST /q3 HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabcd",
        "POST /q4 HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\nabc",
        "POST /q5 HTTP/1.1\r\nHost: x\r\nContent-Length: 3 \r\n\r\nabc",
        "GET /r HTTP/1.1\r\nHost: x\r\nFoo Bar: x\r\n\r\n",
        "GET /s HTTP/1.1\r\nHost: x\r\nX_Foo: x\r\n\r\n",
        "GET /t HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",
        "GET /u HTTP/1.1\r\nHost: x\r\nX: a\0b\r\n\r\n",
        "GET /v HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
        "GET /w\\..\\x HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        "GET /y HTTP/1.1\r\n\r\n",
        "GET /z?a=\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for case in cases {
        let before = upstream.hits();
        let answer = raw(gw.addr, case.as_bytes()).await;
        let got: Vec<String> = upstream.received()[before..]
            .iter()
            .map(|r| format!("{} {:?}", r.uri, r.headers))
            .collect();
        println!(
            "{:?}\n  -> {:?}\n  upstream {:?}\n",
            case,
            answer.lines().next(),
            got
        );
    }
}
